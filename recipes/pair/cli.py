"""`dualbrain train-pair`: the click command (registered by the main CLI)."""
from __future__ import annotations

from pathlib import Path

import click

from dualbrain.console import progress_bar


@click.command("train-pair")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="The pair's directory (written atomically): checkpoints, exports, questions.jsonl, recipe.json.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the names, the digits and the training.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch's threads (the trained weights depend on it; the committed pair used 2).")
def train_pair(out, seed, threads):
    """Train the tiny pair on the CPU (about 10 minutes on 2 cores) and export it.

    \b
    A dense Qwen3.5 small model memorises the digits of 400 made-up names ("kazo3"); a Qwen3.6 MoE
    large model with an MTP head learns sums of digits ("3+5=8"); `align` trains bridges between them
    on questions over 200 of the names ("kazo+tilo=8"), both models frozen. The other 200 names are
    held out: questions.jsonl asks 500 questions over them. Then:

    \b
      dualbrain bench --solver --pair OUT      the table: each mode's accuracy and latency
      dualbrain demo --pair OUT                the modes answering a few of the questions
    """
    from dualbrain.recipes.pair.recipe import PairRecipe
    from dualbrain.recipes.pair.recipe import train_pair as run

    update, bar = progress_bar("training")
    with bar:
        rec = run(out, PairRecipe(seed=seed, threads=threads), progress=update)
    click.echo("took " + ", ".join(f"{k} {v:.0f} s" for k, v in rec.seconds.items())
               + f" ({sum(rec.seconds.values()) / 60:.1f} min)")
    click.echo("while training: " + ", ".join(f"{k} {v:.1%}" for k, v in rec.train_accuracy.items()))
    click.echo(f"wrote the pair to {out}")
