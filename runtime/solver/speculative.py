"""Speculative decoding of one request with a draft model (a first, single-row version; the engine
mode that runs it per row inside a batch builds on the same steps).

Each round: the drafter feeds what it has not seen yet and proposes k tokens; the target verifies the
pending token and the k drafts in one call (`logits_to_keep = k + 1`); `accept.verify` keeps a prefix;
both states go back to the kept prefix through their marks (`State.rollback`: GDN states from the
window variants' per-position states, attention by length) -- nothing is re-run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dualbrain.runtime.model import Model
from dualbrain.runtime.sampling import SamplingParams, filtered_probs
from dualbrain.runtime.solver.accept import draw, verify
from dualbrain.runtime.state import State


@dataclass
class SpeculativeResult:
    new_ids: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    target_state: State | None = None    # where each model stands at the end (a continuation resumes here)
    draft_state: State | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def speculative_generate(target: Model, drafter: Model, prompt: list[int], params: SamplingParams,
                         *, draft_tokens: int = 4) -> SpeculativeResult:
    """Generate `params.max_new_tokens` tokens distributed exactly as `target` alone would
    (token-identical when greedy). Presence penalty is not applied here."""
    if draft_tokens < 1:
        raise ValueError("draft_tokens must be >= 1")
    rng = np.random.default_rng(params.seed)
    need = len(prompt) + params.max_new_tokens + draft_tokens + 2
    big, small = target.new_state(1, capacity=need), drafter.new_state(1, capacity=need)
    ids = np.asarray([prompt], np.int64)
    x0 = draw(filtered_probs(target.forward(ids, big), params)[0], rng)
    drafter.forward(ids, small)
    res = SpeculativeResult([x0], target_state=big, draft_state=small)
    pending = [x0]                       # tokens the drafter has not fed yet
    eos = set(target.eos_ids)
    while len(res.new_ids) < params.max_new_tokens and x0 not in eos:
        k = min(draft_tokens, params.max_new_tokens - len(res.new_ids))
        small.mark()
        logits = drafter.forward(np.asarray([pending], np.int64), small)
        drafts, qs = [], []
        for i in range(k):
            q = filtered_probs(logits, params)[0]
            drafts.append(draw(q, rng))
            qs.append(q)
            if i < k - 1:
                logits = drafter.forward(np.asarray([[drafts[-1]]], np.int64), small)
        big.mark()
        p = filtered_probs(target.forward(np.asarray([[x0] + drafts], np.int64), big, logits_to_keep=k + 1)[0],
                           params)
        v = verify(drafts, np.stack(qs), p, rng)
        big.rollback(0, v.accepted + 1)           # x0 and the accepted drafts
        big.unmark()
        fed = len(pending) + k - 1                # the drafter fed pending and all but the last draft
        small.rollback(0, min(len(pending) + v.accepted, fed))
        small.unmark()
        pending = ([drafts[-1]] if v.accepted == k else []) + [v.tokens[-1]]
        res.drafted += k
        res.accepted += v.accepted
        for t in v.tokens:
            if len(res.new_ids) < params.max_new_tokens and res.new_ids[-1] not in eos:
                res.new_ids.append(t)
        x0 = res.new_ids[-1]
    return res
