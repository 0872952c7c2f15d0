"""Cascade: the small model answers; the large model is called only when the small one is unsure.

Each round the small model writes a window of w tokens per row. Its confidence over the window is
the lowest top-1 probability of its own (unwarped, temperature 1) next-token distributions. A
confident window is emitted as it is, and the large model does not run: it lags behind, and its
unfed tokens wait. An unsure window escalates: the large model takes everything it has not seen plus
the window in one verify call (the speculative accept/resample rule), the agreeing prefix is kept
and the large model's token replaces the first disagreement, then the small model goes on. So a
threshold of 0 gives the small model alone, and a threshold above 1 (every window escalates) the
large model alone (token-identical when greedy; distributed as the large model when sampling).
The first token comes from the first window (the small model's prefill holds the prompt's last
token back), so it too is checked when that window escalates.
"""
from __future__ import annotations

import numpy as np

from dualbrain.runtime.engine import Engine, Request
from dualbrain.runtime.model import Model
from dualbrain.runtime.solver.accept import Verdict
from dualbrain.runtime.solver.drafters import ModelDrafter
from dualbrain.runtime.solver.speculative import DraftVerify


def confidence(logits: list[np.ndarray]) -> float:
    """The lowest top-1 probability over a window of raw logits (each (V,))."""
    z = np.stack(logits).astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return float((1.0 / np.exp(z).sum(axis=-1)).min())      # softmax's top-1 = 1 / sum(exp(z - max))


class CascadeDecode(DraftVerify):
    def __init__(self, small: Model, window: int = 4, threshold: float = 0.5):
        super().__init__(ModelDrafter(small, hold_last=True), window)
        self.threshold = threshold

    def prefill(self, engine: Engine, req: Request, chunk: list[int]) -> np.ndarray | None:
        # the large model reads the prompt only when a window escalates; the first token is the small
        # model's, chosen in its first window
        self.drafter.prefill(engine, req, chunk, req.fed)
        return None

    def room(self, engine: Engine, req: Request) -> int:
        g = req.generation
        lag = len(g.prompt_ids) + len(g.new_ids) - int(engine.state.positions[req.row])
        left = req.params.max_new_tokens - len(g.new_ids)
        return max(1, min(self.draft_tokens, left, engine.model.max_context - engine.state.length - lag - 1, self.drafter.room() - 2))

    def decode(self, engine: Engine, live: list[tuple[int, Request]]) -> None:
        plans = {r: (req, self.room(engine, req)) for r, req in live}
        props = self.drafter.propose(engine, plans)
        unsure = {r: (plans[r][0], props[r]) for r in plans if confidence(props[r].logits) < self.threshold}
        verdicts: dict[int, Verdict] = self.verify(engine, unsure) if unsure else {}
        for r in plans:
            verdicts.setdefault(r, Verdict(len(props[r].drafts), list(props[r].drafts)))
        self.drafter.settle(engine, {r: (verdicts[r].accepted, k) for r, (_, k) in plans.items()})
        for r, (req, k) in plans.items():
            g = req.generation
            g.rounds += 1
            if r in unsure:
                g.escalations += 1
                g.drafted += k
                g.accepted += verdicts[r].accepted
            engine.emit(req, verdicts[r].tokens)


__all__ = ["CascadeDecode", "confidence"]
