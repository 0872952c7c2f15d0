"""The tiny trained pair: a recipe that trains it on the CPU (`recipe.train_pair`, `dualbrain train-pair`)
and the pair it produced, committed under `trained/` (`TRAINED`): the default of `dualbrain demo` and
`dualbrain bench --solver`. This module imports nothing heavy: the runtime reads `PairDir` only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualbrain.errors import DualbrainError


@dataclass(frozen=True)
class PairDir:
    """Where a trained pair's pieces lie in its directory (`dualbrain train-pair -o DIR`)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    small_checkpoint = property(lambda self: self.root / "small")
    large_checkpoint = property(lambda self: self.root / "large")
    bridges_trained = property(lambda self: self.root / "bridges")
    small = property(lambda self: self.root / "small-onnx")
    large = property(lambda self: self.root / "large-onnx")
    bridges = property(lambda self: self.root / "bridges-onnx")
    questions = property(lambda self: self.root / "questions.jsonl")

    def check(self) -> "PairDir":
        for p in (self.small, self.large, self.bridges, self.questions):
            if not p.exists():
                raise DualbrainError(f"{self.root} is not a trained pair (`dualbrain train-pair -o DIR`): no {p.name}")
        return self


TRAINED = PairDir(Path(__file__).parent / "trained")
