"""Speculative sampling's accept/resample rule (Leviathan et al. 2023; Chen et al. 2023), numpy only.

A drafter proposed tokens d_1..d_k, each drawn from its distribution q_i; the target's distributions
p_0..p_k come from one verify call (p_{i-1} is the target's distribution for the token d_i stands
in for; every p and q is already warped by the request's sampling parameters). For i = 1..k: accept
d_i with probability min(1, p_{i-1}(d_i) / q_i(d_i)); at the first rejection, draw the replacement from
the residual norm(max(0, p_{i-1} - q_i)) and stop; if every draft is accepted, draw one more token
from p_k. Each emitted token is then distributed exactly as the target alone would draw it.

Greedy requests pass one-hot p and q: a draft is accepted iff it is the target's argmax, and the
replacement is the argmax — token-identical to the target alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dualbrain.runtime.sampling import SamplingParams, filtered_probs


@dataclass(frozen=True)
class Verdict:
    accepted: int          # drafts kept (0..k)
    tokens: list[int]      # the accepted drafts, then the replacement or bonus token (accepted + 1 tokens)


def warped(logits: np.ndarray, params: SamplingParams, presence: np.ndarray | None = None,
           drafts: list[int] = ()) -> np.ndarray:
    """The request's distributions (N, V) at N consecutive positions from their logits (N, V), as its
    sampler would draw them: position i counts the request's `presence` (V,) and `drafts[:i]` as
    already generated (the presence penalty sees the drafts before it)."""
    n = logits.shape[0]
    if params.is_greedy or params.presence_penalty == 0 or presence is None:
        return filtered_probs(logits, params)
    masks = np.repeat(np.asarray(presence, bool)[None], n, axis=0)
    for i, d in enumerate(list(drafts)[:n - 1]):
        masks[i + 1:, d] = True
    return filtered_probs(logits, params, masks)


def accept_probability(p: np.ndarray, q: np.ndarray, token: int) -> float:
    """min(1, p(token) / q(token)); a draft has q(token) > 0 since it was drawn from q."""
    return 1.0 if p[token] >= q[token] else float(p[token] / q[token])


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where a rejected draft's replacement is drawn from. When p <= q nowhere
    has mass left (p == q, so no draft can be rejected) it is p itself."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from `probs` (V,), by inverse CDF (the same draw as runtime.sampling.Sampler)."""
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(min(np.sum(cdf <= u), len(probs) - 1))


def verify(drafts: list[int], q: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> Verdict:
    """Apply the rule to one row: `drafts` (k,), `q` (k, V) the drafter's distributions, `p` (k+1, V)
    the target's."""
    k = len(drafts)
    if q.shape[0] != k or p.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need {k} draft and {k + 1} target distributions, got {q.shape[0]} and {p.shape[0]}")
    tokens: list[int] = []
    for i, d in enumerate(drafts):
        if rng.random() < accept_probability(p[i], q[i], d):
            tokens.append(int(d))
            continue
        tokens.append(draw(residual(p[i], q[i]), rng))
        return Verdict(i, tokens)
    tokens.append(draw(p[k], rng))
    return Verdict(k, tokens)
