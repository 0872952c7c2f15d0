"""Terminal helpers shared by the commands."""
from __future__ import annotations

import sys
from typing import Callable


def progress_bar(verb: str):
    """A rich progress bar for block-by-block work: returns (update(name, done, total), bar)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), disable=not sys.stderr.isatty())
    task = None

    def update(name: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(verb, total=total)
        bar.update(task, completed=done, description=f"{verb} {name}")

    return update, bar


ProgressFn = Callable[[str, int, int], None]
