"""Top-1 agreement of a model with a reference over teacher-forced positions (how much a precision drifts).

The positions are the reference's own greedy text: each prompt is continued greedily by the
reference, then both models read the same prompt + continuation the way generation does (the prompt
in one call, then one token per call: a backend may run the two differently, e.g. dualbrain's CPU
kernels serve decode-sized calls) and, at every position whose next token the reference generated,
their argmax is compared. So each position asks "given
the same history, does this model pick the reference's token?" on text the reference finds likely
(peaked logits), and one disagreement cannot derail the positions after it. Positions where the
reference itself is unsure (top-1 probability under CONFIDENT) are counted apart as well: there a
coin-flip between near-equal tokens is not drift.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dualbrain.runtime.model import Model


CONFIDENT = 0.5


@dataclass(frozen=True)
class Agreement:
    agree: int
    positions: int
    confident_agree: int = 0
    confident_positions: int = 0      # positions where the reference's top-1 probability >= CONFIDENT

    @property
    def rate(self) -> float:
        return self.agree / self.positions if self.positions else float("nan")

    @property
    def confident_rate(self) -> float:
        return self.confident_agree / self.confident_positions if self.confident_positions else float("nan")


def greedy_continuation(model: Model, prompt: Sequence[int], n: int) -> list[int]:
    """`n` greedy tokens after `prompt` (batch 1)."""
    state = model.new_state(1)
    logits = model.forward(np.asarray([prompt], np.int64), state)
    out = [int(logits[0].argmax())]
    for _ in range(n - 1):
        out.append(int(model.forward(np.asarray([[out[-1]]], np.int64), state)[0].argmax()))
    return out


def teacher_forced_log_probs(model: Model, ids: Sequence[int], first: int) -> np.ndarray:
    """float64 log-probabilities [len(ids) - first, V] of `model` at positions first-1 .. len(ids)-2 of
    `ids` (its predictions of tokens first .. end): ids[:first] in one call, then one token per call."""
    state = model.new_state(1, capacity=len(ids))
    logits = [model.forward(np.asarray([ids[:first]], np.int64), state)]
    logits += [model.forward(np.asarray([[t]], np.int64), state) for t in ids[first:-1]]
    z = np.concatenate(logits).astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def teacher_forced(model: Model, ids: Sequence[int], first: int) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, top-1 probability) at the positions of `teacher_forced_log_probs`."""
    lp = teacher_forced_log_probs(model, ids, first)
    return lp.argmax(-1), np.exp(lp.max(-1))


def top1_agreement(reference: Model, others: Sequence[Model], prompts: Sequence[Sequence[int]],
                   positions: int = 256) -> list[Agreement]:
    """Each of `others` against `reference` over `positions` teacher-forced positions, spread evenly
    over `prompts` (the reference's greedy continuation of each)."""
    per = -(-positions // len(prompts))
    agree = np.zeros((len(others), 2), np.int64)
    total = confident = 0
    for prompt in prompts:
        n = min(per, positions - total)
        if n <= 0:
            break
        ids = list(prompt) + greedy_continuation(reference, prompt, n)
        want, p = teacher_forced(reference, ids, len(prompt))
        sure = p >= CONFIDENT
        for i, m in enumerate(others):
            same = teacher_forced(m, ids, len(prompt))[0] == want
            agree[i] += [int(same.sum()), int(same[sure].sum())]
        total += n
        confident += int(sure.sum())
    return [Agreement(int(a), total, int(c), confident) for a, c in agree]
