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
    # `dualbrain --debug build`: TensorRT's whole log on stderr as it is written (else only a failed
    # build's first error line, in its one-line message)
    debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
    update, bar = progress_bar("building")
    with bar:
        man = run_build(export_dir, r, engines, progress=update,
                        log=(lambda severity, msg: click.echo(f"[TensorRT {severity}] {msg}", err=True)) if debug else None)
    variants = [b["window"] for b in man["blocks"] if b.get("window")]
    total = sum(b["size"] for b in man["blocks"]) + sum(v["size"] for v in variants)
    click.echo(f"built {len(man['blocks'])} engines for {r.target} ({', '.join(r.compute_capabilities)}) with "
               f"{man['flavour']} {man['tensorrt_version']}: {engines} ({total / 2**20:.1f} MiB), "
               f"and {len(variants)} for their window variants")
    click.echo(f"took {man['build']['seconds']:.1f} s, TensorRT worker peak host memory "
               f"{man['build']['worker_peak_rss_mib']:.0f} MiB; each call takes at most {man['max_batch']} rows of "
               f"{man['max_new_positions']} new positions, {man['max_context']} positions per row in all")
