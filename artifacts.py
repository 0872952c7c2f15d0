"""Crash-safe output directories: build in `OUT.partial/`, rename to `OUT` only when complete.

- Any error removes `OUT.partial/` (nothing half-written that looks finished), and a previous `OUT`
  stays untouched until the final rename.
- An interruption (Ctrl-C, or a kill that gives Python no chance to run) leaves `OUT.partial/` in
  place. A command that passes a `resume_key` then reuses it on the next run: its `Journal` records
  each finished piece with the sha256 of its files, and pieces whose files still match are kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from dualbrain.errors import DualbrainError

JOURNAL = ".journal.json"


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class Journal:
    """What a resumable command has finished inside `OUT.partial/`, with file digests."""

    def __init__(self, part: Path, key: str | None):
        self.path = part / JOURNAL
        self.key = key
        self.done: dict[str, dict[str, dict]] = {}
        self.resumed = False

    def load(self) -> bool:
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(d, dict) or d.get("key") != self.key or not isinstance(d.get("done"), dict):
            return False
        self.done = d["done"]
        self.resumed = True
        return True

    def finished(self, piece: str) -> dict[str, dict] | None:
        """The digests of `piece`'s files if it was finished and every file still matches, else None."""
        from dualbrain.runtime.manifest import file_digest

        files = self.done.get(piece)
        if not isinstance(files, dict) or not files:
            return None
        part = self.path.parent
        for rel, digest in files.items():
            p = part / rel
            if not p.is_file() or file_digest(p) != digest:
                return None
        return files

    def record(self, piece: str, files: dict[str, dict]) -> None:
        self.done[piece] = files
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": self.done}), encoding="utf-8")
        os.replace(tmp, self.path)  # atomic: a kill never leaves a torn journal


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield `OUT.partial/` to write into; on success replace `OUT` with it."""
    with _output_dir(Path(out), None) as (part, _):
        yield part


@contextlib.contextmanager
def resumable_output_dir(out: str | os.PathLike, key: str) -> Iterator[tuple[Path, Journal]]:
    """Like `atomic_output_dir`, but an `OUT.partial/` left by an interrupted run with the same
    `key` is reused: the yielded `Journal` says which pieces are already finished."""
    with _output_dir(Path(out), key) as pair:
        yield pair


@contextlib.contextmanager
def _output_dir(out: Path, key: str | None) -> Iterator[tuple[Path, Journal]]:
    if out.exists() and not out.is_dir():
        raise DualbrainError(f"output path {out} exists and is not a directory")
    part = partial_path(out)
    journal = Journal(part, key)
    if part.exists() and not (key and journal.load()):
        shutil.rmtree(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.mkdir(exist_ok=True)
    try:
        yield part, journal
    except KeyboardInterrupt:
        if not key:
            shutil.rmtree(part, ignore_errors=True)
        raise  # resumable: keep OUT.partial/ for the next run
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    (part / JOURNAL).unlink(missing_ok=True)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(part, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, out)
