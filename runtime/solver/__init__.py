"""The solver: modes that run two models (or a model and its MTP head) together on the step engine.

    mode = build_mode("speculative", large, small, SolverOptions(draft_tokens=4))
    engine = Engine(large, mode=mode)          # a solver request is one engine request

- `accept.py`: the speculative accept/resample rule (exact);
- `drafters.py`: what proposes tokens: a small model (`ModelDrafter`) or the MTP head (`MtpDrafter`);
- `speculative.py`: draft, verify in one call, roll back what was rejected (per row, ragged);
- `cascade.py`: the small model answers, escalating unsure windows to the large one;
- `fused.py`: both models' layers interleaved, bridges between them (runtime/bridges.py);
- `pair.py`: loading two exports as a pair, refused when their tokenizers differ.

`MODES` is the one list of solver modes: the CLI's choices, the bench's and the API's read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dualbrain.errors import DualbrainError


@dataclass(frozen=True)
class SolverOptions:
    draft_tokens: int = 4            # speculative/mtp: the most drafts a round (adaptive below it); cascade: window
    adaptive: bool = True            # speculative/mtp: adapt k per row
    threshold: float = 0.5           # cascade: escalate a window whose lowest top-1 probability is below this
    mtp_feed: str = "final-normed"   # mtp: how the target's hidden state enters the head (drafters.MtpDrafter)
    bridges: str | None = None       # fused: the export of the pair's bridges (dualbrain export BRIDGES -o OUT)
    parallel: bool | None = None     # fused: the small model on its own thread (None: when there are >= 4 cores)


def _speculative(large, small, o: SolverOptions):
    from dualbrain.runtime.solver.drafters import ModelDrafter
    from dualbrain.runtime.solver.speculative import SpeculativeDecode

    return SpeculativeDecode(ModelDrafter(small), o.draft_tokens, adaptive=o.adaptive)


def _mtp(large, small, o: SolverOptions):
    from dualbrain.runtime.solver.drafters import MtpDrafter
    from dualbrain.runtime.solver.speculative import SpeculativeDecode

    return SpeculativeDecode(MtpDrafter(large, feed=o.mtp_feed), o.draft_tokens, adaptive=o.adaptive)


def _cascade(large, small, o: SolverOptions):
    from dualbrain.runtime.solver.cascade import CascadeDecode

    return CascadeDecode(small, o.draft_tokens, o.threshold)


def _fused(large, small, o: SolverOptions):
    from dualbrain.runtime.solver.fused import Bridges, FusedDecode, FusedPair

    return FusedDecode(FusedPair(large, small, Bridges.load(o.bridges, large), parallel=o.parallel))


@dataclass(frozen=True)
class ModeSpec:
    name: str
    needs_small: bool
    build: Callable          # (large Model, small Model | None, SolverOptions) -> engine mode
    help: str
    needs_bridges: bool = False
    # ONNX Runtime threads for (large, small) given the machine's cores; None: ONNX Runtime's default
    threads: Callable[[int], tuple[int | None, int | None]] = lambda cores: (None, None)

    def check(self, has_small: bool, draft_tokens: int, has_bridges: bool = False) -> None:
        """Refuse a combination the mode cannot run (before any model loads)."""
        if self.needs_small and not has_small:
            raise DualbrainError(f"--mode {self.name} needs the small model: --small S_OUT")
        if self.needs_bridges != has_bridges:
            raise DualbrainError(f"--mode {self.name} needs the pair's bridges: --bridges B_OUT" if self.needs_bridges
                                 else f"--bridges is for --mode fused, not {self.name}")
        if draft_tokens < 1:
            raise DualbrainError("--draft-tokens must be at least 1")


MODES: dict[str, ModeSpec] = {m.name: m for m in (
    ModeSpec("speculative", True, _speculative, "the small model drafts, the large verifies (exact)"),
    ModeSpec("mtp", False, _mtp, "the large model's own MTP head drafts, the large verifies (exact)"),
    ModeSpec("cascade", True, _cascade, "the small model answers; unsure windows escalate to the large"),
    ModeSpec("fused", True, _fused, "the models' layers interleaved, bridges carry the small model's states "
                                     "into the large one (--bridges)", needs_bridges=True,
             # when the small model runs beside the large one, each gets its share of the cores
             threads=lambda cores: (cores - max(1, cores // 4), max(1, cores // 4)) if cores >= 4 else (None, None)),
)}


def build_mode(name: str, large, small=None, options: SolverOptions = SolverOptions()):
    """The engine mode `name` over `large` (and `small`, for the modes that need one)."""
    spec = MODES.get(name)
    if spec is None:
        raise DualbrainError(f"unknown solver mode {name!r} (choose from {', '.join(MODES)})")
    spec.check(small is not None, options.draft_tokens, options.bridges is not None)
    return spec.build(large, small, options)
