"""Crash-safe output directories: build in `OUT.partial/`, rename to `OUT` only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from dualbrain.errors import DualbrainError


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield `OUT.partial/` to write into; on success replace `OUT` with it.

    On any exception the partial directory is removed (nothing half-written is left behind) and
    a previous `OUT` stays untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DualbrainError(f"output path {out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise DualbrainError(f"output directory {out} already exists")
    part = partial_path(out)
    if part.exists():
        shutil.rmtree(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.mkdir()
    try:
        yield part
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(part, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, out)
