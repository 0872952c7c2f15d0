"""Drafters: what proposes tokens for the large model to verify, in rows parallel to the engine's.

Two kinds behind one interface (the engine's mode calls them; neither knows the other):
- `ModelDrafter`: a separate small model with its own state (speculative; cascade's answering model);
- `MtpDrafter`: the large model's own multi-token-prediction head (`mtp` side block), with its own
  K/V cache, fed pairs (target hidden state at t, token t+1) and chained on its own output.

What each has fed is read off its state's per-row positions, so nothing is counted twice: a
`ModelDrafter` row lags the request's sequence by `seq[positions[row]:]`; an MTP row has fed the
pairs of positions `0..positions[row] - 1`. A round is `propose` (marks the drafter's state) then
`settle` (rolls every drafted row back to what the verdict kept, re-running nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.blocks import model_feeds
from dualbrain.runtime.model import Model
from dualbrain.runtime.solver.accept import draw, warped
from dualbrain.runtime.state import State


@dataclass
class Proposal:
    """One row's drafts: the tokens, the drafter's raw logits (k, V) and the distributions (k, V)
    the tokens were drawn from (the request's sampling parameters applied)."""
    drafts: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)


@dataclass
class SolverTrack:
    """A request's record in a solver mode (`Request.solver`)."""
    k: int                                                    # drafts next round (adaptive)
    draft_state: State | None = None                          # the drafter's one-row state during prefill
    hidden: dict[int, np.ndarray] = field(default_factory=dict)   # target hidden state by position (MTP)


def sequence(req) -> list[int]:
    g = req.generation
    return g.prompt_ids + g.new_ids


def _draw(req, logits: np.ndarray, drafts: list[int]) -> tuple[int, np.ndarray]:
    """The next draft from the drafter's logits (V,), drawn as the request's sampler would draw it
    (the drafts before it count as generated for the presence penalty)."""
    sampler = req.sampler
    present = None
    if sampler.presence is not None and sampler.params.presence_penalty and not sampler.params.is_greedy:
        present = sampler.presence[0].copy()        # only the penalty reads it: no (V,) copy per draft otherwise
        present[drafts] = True
    q = warped(logits[None], sampler.params, present)[0]
    if sampler.params.is_greedy:
        return int(np.argmax(q)), q
    return draw(q, sampler.rng), q


class _RowDrafter:
    """Rows parallel to the engine's: a one-row state per prefilling request, moved into the
    request's row when its prefill ends, freed with it. Subclasses say what a state is."""

    model: Model
    state: State | None

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def _new_state(self, batch: int, capacity: int) -> State:
        return self.model.new_state(batch, capacity=capacity)

    def attach(self, engine) -> None:
        self.state = self._new_state(engine.max_batch, min(self.max_context, engine.capacity))

    def admit(self, engine, req) -> None:
        req.solver.draft_state = self._new_state(1, min(self.max_context, req.need))

    def insert(self, engine, row: int, req) -> None:
        self.state.insert(row, req.solver.draft_state)
        req.solver.draft_state = None

    def evict(self, engine, row: int) -> None:
        self.state.evict(row)

    def room(self) -> int:
        """Positions the drafter can still take in its longest row."""
        return self.max_context - self.state.length


class ModelDrafter(_RowDrafter):
    """A separate draft model (System 1), rows parallel to the engine's."""

    needs_hidden = False        # the target's hidden states are not needed

    def __init__(self, model: Model, *, hold_last: bool = False):
        self.model = model
        # hold_last: prefill all but the prompt's last token, which the first round feeds (the cascade,
        # whose first token comes from this model's first window)
        self.hold_last = hold_last
        self.state: State | None = None

    def prefill(self, engine, req, chunk: list[int], start: int) -> None:
        prompt = req.generation.prompt_ids
        if self.hold_last and start + len(chunk) == len(prompt):
            chunk = chunk[:-1]
        if chunk:
            self.model.forward(np.asarray([chunk], np.int64), req.solver.draft_state)

    def observe(self, req, start: int, hidden: np.ndarray) -> None:
        """Target hidden states of positions start.. (not needed by a separate model)."""

    def next_logits(self, feed: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """Feed each row its tokens; the logits (V,) after each row's last one."""
        return {r: res.logits[-1] for r, res in self.model.step_rows(feed, self.state).items()}

    def propose(self, engine, plans: dict[int, tuple[object, int]]) -> dict[int, Proposal]:
        """Draft `k` tokens for each row of `plans` (row -> (request, k >= 1))."""
        st = self.state
        # the tokens it lags by are always kept: feed them before the mark (no per-position states)
        logits = self.next_logits({r: sequence(req)[int(st.positions[r]):] for r, (req, _) in plans.items()})
        st.mark()
        out = {r: Proposal() for r in plans}
        for i in range(max(k for _, k in plans.values())):
            feed = {}
            for r, (req, k) in plans.items():
                if i < k:
                    p = out[r]
                    d, q = _draw(req, logits[r], p.drafts)
                    p.drafts.append(d)
                    p.logits.append(logits[r])
                    p.probs.append(q)
                    if i + 1 < k:
                        feed[r] = [d]
            if feed:
                logits = self.next_logits(feed)
        return out

    def settle(self, engine, kept: dict[int, tuple[int, int]]) -> None:
        """After the verdicts (row -> (drafts accepted, drafted)): keep the accepted drafts it fed (it
        never feeds its own last draft)."""
        for r, (accepted, k) in kept.items():
            self.state.rollback(r, min(accepted, k - 1))
        self.state.unmark()


class MtpDrafter(_RowDrafter):
    """The large model's MTP head as the drafter (self-speculation).

    Position t of the head takes the target's hidden state at t and the embedding of token t+1 and
    predicts token t+2. Each round: catch up on the pairs the target has confirmed since the last
    round (one ragged call, at the target's own positions), mark, then chain the drafts on the head's
    own output (`hidden_out`, fed as is). After the verdict every row returns to the mark: the chained
    positions are replaced by true pairs in the next catch-up.

    `feed`: how a target hidden state enters the head. "final-normed" applies the model's final norm
    first (vLLM's and SGLang's qwen3_5_mtp, llama.cpp), "pre-norm" feeds the last layer's output as is
    (mlx-lm's open MTP work); the published weights cannot settle it here, so it is one switch."""

    needs_hidden = True
    FEEDS = {"final-normed": 1, "pre-norm": 0}

    def __init__(self, model: Model, *, feed: str = "final-normed"):
        block = model.manifest.side("mtp")
        if block is None:
            raise DualbrainError(f"{model.dir} has no MTP head (export a checkpoint with mtp.* tensors)")
        if feed not in self.FEEDS:
            raise DualbrainError(f"MTP feed must be one of {', '.join(self.FEEDS)}, got {feed!r}")
        self.model = model
        self.block = block
        self.normalize = self.FEEDS[feed]
        self.state: State | None = None
        self._hidden_dtype = model.np_dtype(next(t.dtype for t in block.inputs if t.name == "hidden"))

    def _new_state(self, batch: int, capacity: int) -> State:
        return State([self.block], batch, capacity, self.max_context, self.model.np_dtype)

    def observe(self, req, start: int, hidden: np.ndarray) -> None:
        """The target's hidden states (N, H) at positions start..start+N-1 (kept tokens only)."""
        for j, h in enumerate(hidden):
            req.solver.hidden[start + j] = h

    def _pairs(self, req, st: State, row: int, upto: int) -> tuple[np.ndarray, list[int]]:
        """The pairs (hidden at j, token j+1) not fed yet, j < upto; they leave the hidden buffer."""
        seq = sequence(req)
        js = range(int(st.positions[row]), upto)
        hidden = np.stack([req.solver.hidden.pop(j) for j in js]) if js else None
        return hidden, [seq[j + 1] for j in js]

    def prefill(self, engine, req, chunk: list[int], start: int) -> None:
        # the pair of the prompt's last position waits for the first sampled token
        st = req.solver.draft_state
        hidden, ids = self._pairs(req, st, 0, min(start + len(chunk), len(req.generation.prompt_ids) - 1))
        if ids:
            self._run(st, {0: (hidden, ids)}, self.normalize)

    def _run(self, st: State, rows: dict[int, tuple[np.ndarray, list[int]]], normalize: int
             ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """One ragged call of the head: per row (hidden (N, H), next ids (N,)); returns per row the
        logits (V,) and `hidden_out` (H,) at its last pair."""
        width = max(len(ids) for _, ids in rows.values())
        h = np.zeros((st.batch, width, self.model.spec.hidden_size), self._hidden_dtype)
        ids = np.zeros((st.batch, width), np.int64)
        pad = np.zeros((st.batch, width), np.int64)
        for r, (hid, toks) in rows.items():
            n = len(toks)
            h[r, :n], ids[r, :n], pad[r, :n] = hid, toks, 1
        step = st.begin(pad, window=False)
        feeds = model_feeds(self.block.inputs, attention_mask=step.mask, position_ids=step.positions)
        feeds.update(hidden=h, embedded=self.model.embed_ids(ids), normalize_hidden=np.array([normalize], np.int64))
        feeds.update(st.feeds(0))
        out = self.model.backend.run(self.block, feeds)
        step.outputs[0] = out
        st.commit(step)
        return {r: (out["logits"][r, len(t) - 1], out["hidden_out"][r, len(t) - 1]) for r, (_, t) in rows.items()}

    def propose(self, engine, plans: dict[int, tuple[object, int]]) -> dict[int, Proposal]:
        st = self.state
        catch_up = {r: self._pairs(req, st, r, int(engine.state.positions[r])) for r, (req, _) in plans.items()}
        last = self._run(st, catch_up, self.normalize)
        st.mark()
        out = {r: Proposal() for r in plans}
        for i in range(max(k for _, k in plans.values())):
            chain = {}
            for r, (req, k) in plans.items():
                if i < k:
                    logits, hid = last[r]
                    p = out[r]
                    d, q = _draw(req, logits, p.drafts)
                    p.drafts.append(d)
                    p.logits.append(logits)
                    p.probs.append(q)
                    if i + 1 < k:
                        chain[r] = (hid[None], [d])
            if chain:
                last.update(self._run(st, chain, 0))
        return out

    def settle(self, engine, kept: dict[int, tuple[int, int]]) -> None:
        for r in kept:
            self.state.rollback(r, 0)
        self.state.unmark()
