"""Speculative decoding as an engine mode: a drafter proposes, the large model verifies, per row.

Each engine step is one round for every running row: the drafter (a small model, or the large
model's MTP head: runtime/solver/drafters.py) proposes k_r tokens per row, the large model verifies
every row's pending token and drafts in ONE call (right-padded: rows verify different numbers of
drafts), `accept.verify` keeps a prefix per row with the exact accept/resample rule, and both
models' rows go back to what was kept through their state marks -- nothing is re-run. Adaptive k:
a row that accepted every draft drafts one more next round (up to `draft_tokens`), one that accepted
fewer than half drafts one fewer (down to 1).

`DraftVerify` is what speculative and cascade share (runtime/solver/cascade.py): the drafter kept in
step with the engine's rows, and the verify call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.engine import Engine, PlainDecode, Request
from dualbrain.runtime.model import Model
from dualbrain.runtime.sampling import SamplingParams
from dualbrain.runtime.solver.accept import Verdict, verify, warped
from dualbrain.runtime.solver.drafters import ModelDrafter, Proposal, SolverTrack, sequence


class DraftVerify(PlainDecode):
    """A mode with a drafter beside the engine's model (the large one, which verifies)."""

    def __init__(self, drafter, draft_tokens: int = 4):
        if draft_tokens < 1:
            raise DualbrainError("draft_tokens must be at least 1")
        self.drafter = drafter
        self.draft_tokens = draft_tokens

    def attach(self, engine: Engine) -> None:
        if self.drafter.model.vocab_size != engine.model.vocab_size:
            raise DualbrainError(f"the drafter's vocabulary ({self.drafter.model.vocab_size} ids) differs from the "
                                 f"large model's ({engine.model.vocab_size})")
        self.drafter.attach(engine)

    def admit(self, engine: Engine, req: Request) -> None:
        req.solver = SolverTrack(k=self.draft_tokens)
        self.drafter.admit(engine, req)

    def prefill(self, engine: Engine, req: Request, chunk: list[int]) -> np.ndarray | None:
        start = req.fed
        ids = np.asarray([chunk], np.int64)
        if self.drafter.needs_hidden:
            last = len(engine.model.layers) - 1
            res = engine.model.step(ids, req.state, hidden_after=(last,))
            self.drafter.observe(req, start, res.hidden_after[last][0])
            logits = res.logits[:, -1]
        else:
            logits = engine.model.forward(ids, req.state)
        self.drafter.prefill(engine, req, chunk, start)
        return logits

    def insert(self, engine: Engine, row: int, req: Request) -> None:
        self.drafter.insert(engine, row, req)

    def evict(self, engine: Engine, row: int) -> None:
        self.drafter.evict(engine, row)

    def verify(self, engine: Engine, rows: dict[int, tuple[Request, Proposal]]) -> dict[int, Verdict]:
        """One call of the large model over each row's unverified tokens and drafts; the verdicts,
        with the large model's rows already back at what each kept (the replacement or bonus token
        becomes its next input)."""
        st = engine.state
        st.mark()
        feed, lag = {}, {}
        for r, (req, prop) in rows.items():
            pending = sequence(req)[int(st.positions[r]):]
            lag[r] = len(pending)
            feed[r] = pending + prop.drafts
        res = engine.model.step_rows(feed, st, last={r: len(p.drafts) + 1 for r, (_, p) in rows.items()})
        verdicts = {}
        for r, (req, prop) in rows.items():
            sampler = req.sampler
            present = sampler.presence[0] if sampler.presence is not None else None
            p = warped(res[r].logits, sampler.params, present, prop.drafts)
            q = np.stack(prop.probs) if prop.drafts else np.zeros((0, p.shape[1]))
            v = verify(prop.drafts, q, p, sampler.rng)
            st.rollback(r, lag[r] + v.accepted)
            self.drafter.observe(req, int(st.positions[r]) - v.accepted - 1, res[r].hidden[:v.accepted + 1])
            verdicts[r] = v
        st.unmark()
        return verdicts

    def room(self, engine: Engine, req: Request) -> int:
        """How many drafts this row may take: what is left to generate (a verify emits one more than it
        accepts) and the positions both models have left."""
        g = req.generation
        left = req.params.max_new_tokens - len(g.new_ids) - 1
        return max(0, min(left, engine.model.max_context - engine.state.length - 2, self.drafter.room() - 2))


class SpeculativeDecode(DraftVerify):
    """Exact speculative decoding: every round is drafted and verified."""

    def __init__(self, drafter, draft_tokens: int = 4, *, adaptive: bool = True):
        super().__init__(drafter, draft_tokens)
        self.adaptive = adaptive

    def decode(self, engine: Engine, live: list[tuple[int, Request]]) -> None:
        plans = {r: (req, min(req.solver.k, self.room(engine, req))) for r, req in live}
        drafting = {r: plan for r, plan in plans.items() if plan[1] > 0}
        props = self.drafter.propose(engine, drafting) if drafting else {}
        verdicts = self.verify(engine, {r: (req, props.get(r, Proposal())) for r, (req, _) in plans.items()})
        if drafting:
            self.drafter.settle(engine, {r: (verdicts[r].accepted, k) for r, (_, k) in drafting.items()})
        for r, (req, k) in plans.items():
            v = verdicts[r]
            g = req.generation
            g.rounds += 1
            g.drafted += k
            g.accepted += v.accepted
            if self.adaptive and k:
                t = req.solver
                t.k = min(t.k + 1, self.draft_tokens) if v.accepted == k else \
                    max(1, t.k - 1) if 2 * v.accepted < k else t.k
            engine.emit(req, v.tokens)


@dataclass
class SpeculativeResult:
    new_ids: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    finish_reason: str | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def speculative_generate(target: Model, drafter: Model | ModelDrafter, prompt: list[int], params: SamplingParams,
                         *, draft_tokens: int = 4, adaptive: bool = True) -> SpeculativeResult:
    """One request on a one-row engine in speculative mode: `params.max_new_tokens` tokens distributed
    exactly as `target` alone would draw them (token-identical when greedy)."""
    drafter = drafter if not isinstance(drafter, Model) else ModelDrafter(drafter)
    engine = Engine(target, max_batch=1, prefill_chunk=max(1, len(prompt)),
                    capacity=len(prompt) + params.max_new_tokens + draft_tokens + 2,
                    mode=SpeculativeDecode(drafter, draft_tokens, adaptive=adaptive))
    g = engine.submit(prompt, params).result()
    return SpeculativeResult(g.new_ids, g.drafted, g.accepted, g.finish_reason)
