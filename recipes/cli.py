"""`dualbrain build`: the click command (registered by the main CLI with ``main.add_command(build)``)."""
from __future__ import annotations

from pathlib import Path

import click

from dualbrain.console import progress_bar


@click.command("build")
@click.argument("export_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--recipe", required=True, metavar="NAME|PATH",
              help="A bundled recipe name (e.g. rtx4090-fp16) or a recipe .toml file.")
@click.option("-o", "--out", "engines", required=True, type=click.Path(path_type=Path),
              help="Engines directory (written atomically).")
def build(export_dir, recipe, engines):
    """Build TensorRT engines (one per block) for the export in OUT, following a recipe."""
    from dualbrain.recipes.build import build as run_build
    from dualbrain.recipes.schema import load_recipe

    r = load_recipe(recipe)
    update, bar = progress_bar("building")
    with bar:
        man = run_build(export_dir, r, engines, progress=update)
    variants = [b["window"] for b in man["blocks"] if b.get("window")]
    total = sum(b["size"] for b in man["blocks"]) + sum(v["size"] for v in variants)
    click.echo(f"built {len(man['blocks'])} engines for {r.target} ({', '.join(r.compute_capabilities)}) with "
               f"{man['flavour']} {man['tensorrt_version']}: {engines} ({total / 2**20:.1f} MiB), "
               f"and {len(variants)} for their window variants")
