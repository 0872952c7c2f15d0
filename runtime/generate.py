"""Generation: `generate(model, prompts, params)` on the step engine (runtime/engine.py), one row per
prompt; `prefill` / `decode_one` are the plain building blocks (batched left-padded prefill, one token
per row), for callers and benchmarks that drive a state themselves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.engine import Engine, Generation, PlainDecode
from dualbrain.runtime.model import Model, State
from dualbrain.runtime.sampling import SamplingParams

__all__ = ["Generation", "GenerationStats", "decode_one", "generate", "prefill"]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # new tokens after the first, over the time after the first
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def prefill(model: Model, prompts: Sequence[Sequence[int]], *, new_tokens: int = 0) -> tuple[State, np.ndarray]:
    """Run all prompts (left-padded to one length) through the model; returns state and last logits.
    `new_tokens`: how many tokens will follow, so the KV cache is allocated once for all of them."""
    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), np.int64)
    pad = np.zeros((len(prompts), longest), np.int64)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = p
        pad[i, longest - len(p):] = 1
    state = model.new_state(len(prompts), capacity=min(model.max_context, longest + new_tokens))
    logits = model.forward(ids, state, pad=None if pad.all() else pad)
    return state, logits


def decode_one(model: Model, state: State, tokens: np.ndarray) -> np.ndarray:
    """Feed one token per row; returns next logits (B, V)."""
    return model.forward(tokens.reshape(-1, 1), state)


def generate(model: Model, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             on_token: Callable[[int, int, str], None] | None = None,
             stats: GenerationStats | None = None, mode: PlainDecode | None = None) -> list[Generation]:
    """Generate for each prompt (every row with `params`), on a step engine with one row per prompt
    (in `mode`: plain by default, or a solver mode from runtime/solver).
    `on_token(row, id, text_delta)` streams tokens as they come (a row's last token may report a
    second delta: text held back until the stream ended)."""
    if not prompts:
        raise DualbrainError("every prompt needs at least one token")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = sum(len(p) for p in prompts)
    longest = max(len(p) for p in prompts)
    engine = Engine(model, max_batch=len(prompts), prefill_chunk=longest,
                    capacity=min(model.max_context, longest + params.max_new_tokens), mode=mode)
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params) for p in prompts]     # checks every prompt before anything runs
    t1 = None
    while not engine.idle:
        engine.step()
        if on_token:
            for row, req in enumerate(reqs):
                for tok, delta in req.drain():
                    on_token(row, tok, delta)
        if t1 is None and all(r.generation.new_ids for r in reqs):
            t1 = time.perf_counter()       # every prompt prefilled: its first token came from prefill
    t1 = t1 or time.perf_counter()
    stats.prefill_s = t1 - t0
    stats.decode_s = time.perf_counter() - t1
    gens = [r.result() for r in reqs]
    stats.new_tokens = sum(len(g.new_ids) for g in gens)
    return gens
