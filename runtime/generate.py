"""Generation: prefill, decode one token at a time, stop on EOS / stop strings / length.

`generate(model, prompts, params)` batches prompts of different lengths (left padding; padding
is masked in attention and zeroed before the GDN mixers, so each row gets its solo tokens).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.model import Model, State
from dualbrain.runtime.sampling import Sampler, SamplingParams


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None    # eos | stop | length


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
             stats: GenerationStats | None = None) -> list[Generation]:
    """Generate for each prompt. `on_token(row, id, text_delta)` streams tokens as they come (a row's
    last token may report a second delta: text held back until the stream ended)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DualbrainError("every prompt needs at least one token")
    for p in prompts:
        model.check_ids(p)
        if len(p) > model.max_context:
            raise DualbrainError(
                f"prompt of {len(p)} tokens is longer than the export's maximum context of {model.max_context}"
            )
    eos = set(model.eos_ids)
    gens = [Generation(list(p)) for p in prompts]
    decoders = None
    texts = [""] * len(prompts)   # streamed text so far, for stop strings
    stop_span = max((len(s) for s in params.stop), default=0)   # a new match ends inside the last delta
    if params.stop or on_token is not None:
        decoders = [model.tokenizer.stream_decoder() for _ in prompts]
    sampler = Sampler(params, len(prompts))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = sum(len(p) for p in prompts)

    t0 = time.perf_counter()
    state, logits = prefill(model, prompts, new_tokens=params.max_new_tokens)
    t1 = time.perf_counter()
    stats.prefill_s = t1 - t0
    active = np.ones(len(prompts), bool)
    while True:
        tokens = sampler(logits)
        for i in np.flatnonzero(active):
            tok = int(tokens[i])
            g = gens[i]
            g.new_ids.append(tok)
            stats.new_tokens += 1
            delta = decoders[i].push(tok) if decoders else ""
            texts[i] += delta
            if on_token:
                on_token(int(i), tok, delta)
            if tok in eos:
                g.finish_reason = "eos"
            elif delta and params.stop and _hit_stop(texts[i][-(len(delta) + stop_span):], params.stop):
                g.finish_reason = "stop"
            elif len(g.new_ids) >= params.max_new_tokens or state.length + 1 > model.max_context:
                g.finish_reason = "length"
            if g.finish_reason:
                active[i] = False
                tail = decoders[i].flush() if decoders else ""   # bytes held back for a whole character
                if tail and on_token:
                    on_token(int(i), tok, tail)
        if not active.any():
            break
        logits = decode_one(model, state, tokens)
    # the first token came from prefill's logits: decode time is everything after it
    stats.decode_s = time.perf_counter() - t1
    for g in gens:
        g.text = model.tokenizer.decode(g.new_ids, skip_special_tokens=True) if model.manifest.tokenizer_files else ""
        if g.finish_reason == "stop":
            g.text = _cut_at_stop(g.text, params.stop)
    return gens


def _hit_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
