"""Next-token sampling for the runtime (numpy only).

Pipeline, per row, in this order (the order transformers applies its warpers in):

1. presence penalty -- subtract ``presence_penalty`` from the logit of every token that was already
   *generated* in that row (vLLM / OpenAI semantics: any occurrence counts once). Prompt tokens are
   deliberately NOT counted: Qwen's recommended ``presence_penalty`` (1.5 for non-thinking mode) is
   specified for vLLM/SGLang, which count output tokens only. Callers that really want prompt tokens
   penalised can feed them through ``Sampler.observe``.
2. temperature  -- divide by ``temperature``.
3. top-k        -- keep the tokens whose logit is >= the k-th largest (ties kept, like
   ``TopKLogitsWarper``); ``top_k == 0`` disables it.
4. top-p        -- nucleus filtering with exactly ``TopPLogitsWarper`` semantics: sort ascending,
   drop tokens whose ascending cumulative probability is <= ``1 - top_p``, always keep the most
   likely token. ``top_p == 1`` disables it.
5. softmax, then one draw per row from the sampler's own ``numpy.random.Generator``.

Greedy decoding (``greedy=True`` or ``temperature == 0``) is a plain argmax of the raw logits
(ties -> lowest id); the presence penalty and the filters are not applied in greedy mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dualbrain.errors import DualbrainError

__all__ = [
    "SamplingParams",
    "THINKING",
    "NON_THINKING",
    "default_params",
    "filtered_probs",
    "Sampler",
    "TokenLogprobs",
    "token_logprobs",
]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. Invalid values raise `DualbrainError` naming the parameter."""

    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    presence_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, why: str) -> DualbrainError:
            return DualbrainError(f"invalid sampling parameter {name}={value!r}: {why}")

        if not isinstance(self.greedy, (bool, np.bool_)):
            raise bad("greedy", self.greedy, "must be true or false")
        for name in ("temperature", "top_p", "presence_penalty"):
            v = getattr(self, name)
            if not _is_real(v):
                raise bad(name, v, "must be a number")
            if not math.isfinite(float(v)):
                raise bad(name, v, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise bad("presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0 (0 disables top-k)")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", self.seed, "must be an integer >= 0 or None")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        try:
            stop = tuple(stop)
        except TypeError:
            raise bad("stop", self.stop, "must be a sequence of strings") from None
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", self.stop, "must contain non-empty strings only")
        # Normalise types (numpy scalars, lists) so the frozen instance is clean and hashable.
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "greedy", bool(self.greedy))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "presence_penalty", float(self.presence_penalty))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def is_greedy(self) -> bool:
        """True when decoding is an argmax (``greedy`` or ``temperature == 0``)."""
        return self.greedy or self.temperature == 0.0

    def replace(self, **overrides: Any) -> "SamplingParams":
        """A copy with ``overrides`` applied and revalidated; ``None`` values are ignored
        (so an unset CLI option keeps the current value; a seed cannot be cleared this way)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise DualbrainError(f"unknown sampling parameter {unknown[0]!r}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


# Qwen's recommended settings (Qwen3 / Qwen3.5 model cards).
THINKING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, presence_penalty=0.0)
NON_THINKING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)


def default_params(
    model_dir_or_generation_config: Mapping[str, Any] | str | os.PathLike | None,
    thinking: bool,
) -> SamplingParams:
    """Default sampling settings for a model.

    Starts from the Qwen preset for the mode (`THINKING` / `NON_THINKING`) and overrides it with
    the values present in the model's ``generation_config.json``: ``temperature``, ``top_p``,
    ``top_k``, ``presence_penalty``; ``do_sample: false`` selects greedy decoding.
    ``repetition_penalty`` (a different, multiplicative penalty) and every other key are ignored.
    Accepts the parsed dict, a model directory (its ``generation_config.json`` is read if present),
    or None (no generation config).
    """
    preset = THINKING if thinking else NON_THINKING
    cfg = model_dir_or_generation_config
    if cfg is None:
        return preset
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg) / "generation_config.json"
        if not path.is_file():
            return preset
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DualbrainError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, Mapping):
        raise DualbrainError("generation config must be a JSON object")
    overrides: dict[str, Any] = {}
    for key in ("temperature", "top_p", "top_k", "presence_penalty"):
        if cfg.get(key) is not None:
            overrides[key] = cfg[key]
    if cfg.get("do_sample") is False:
        overrides["greedy"] = True
    try:
        return preset.replace(**overrides)
    except DualbrainError as e:
        raise DualbrainError(f"generation_config.json: {e}") from None


def _as_2d(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[-1] < 1:
        raise ValueError(f"logits must have shape (B, V) with V >= 1, got {np.shape(logits)}")
    return x


def _one_hot_argmax(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape, dtype=np.float64)
    out[np.arange(x.shape[0]), np.argmax(x, axis=-1)] = 1.0
    return out


def filtered_probs(
    logits: np.ndarray,
    params: SamplingParams,
    presence_mask: np.ndarray | None = None,
) -> np.ndarray:
    """The distribution each row is drawn from, float64, shape (B, V) (a (V,) input gives (1, V)).

    Greedy params give a one-hot at the argmax of the raw logits. ``presence_mask`` is a boolean
    (B, V) array of tokens already generated per row; it is used only when the penalty is non-zero.
    """
    x = _as_2d(logits).astype(np.float64)  # copy
    if params.is_greedy:
        return _one_hot_argmax(x)
    B, V = x.shape

    if presence_mask is not None and params.presence_penalty != 0.0:
        m = np.asarray(presence_mask, dtype=bool)
        if m.shape != x.shape:
            raise ValueError(f"presence_mask shape {m.shape} != logits shape {x.shape}")
        x -= params.presence_penalty * m

    x /= params.temperature

    if 0 < params.top_k < V:
        kth = np.partition(x, V - params.top_k, axis=-1)[:, V - params.top_k, None]
        x[x < kth] = -np.inf

    def softmax(z: np.ndarray) -> np.ndarray:
        z = z - np.max(z, axis=-1, keepdims=True)
        e = np.exp(z)
        return e / np.sum(e, axis=-1, keepdims=True)

    if params.top_p < 1.0:
        order = np.argsort(x, axis=-1, kind="stable")  # ascending, like TopPLogitsWarper
        sorted_probs = np.take_along_axis(softmax(x), order, axis=-1)
        remove_sorted = np.cumsum(sorted_probs, axis=-1) <= (1.0 - params.top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = np.empty_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        x[remove] = -np.inf

    return softmax(x)


class Sampler:
    """Stateful next-token chooser for a batch of ``batch_size`` rows.

    ``sampler(logits)`` returns the chosen ids (B,) int64 and records them in the per-row presence
    mask used by the presence penalty. The mask is allocated on the first call (V from the logits).
    Same seed + same sequence of logits -> same ids.
    """

    def __init__(self, params: SamplingParams, batch_size: int) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.params = params
        self.batch_size = int(batch_size)
        self.rng = np.random.default_rng(params.seed)
        self.presence: np.ndarray | None = None  # (B, V) bool, lazily allocated

    def _ensure_presence(self, vocab: int) -> np.ndarray:
        if self.presence is None:
            self.presence = np.zeros((self.batch_size, vocab), dtype=bool)
        elif self.presence.shape[1] != vocab:
            raise ValueError(f"vocab size changed from {self.presence.shape[1]} to {vocab}")
        return self.presence

    def observe(self, ids: np.ndarray, vocab_size: int | None = None) -> None:
        """Mark tokens as present. ``ids``: (B,) one id per row, or (B, T) several per row
        (negative ids are ignored, handy as padding). Needs the vocab size if no logits were
        seen yet."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape ({self.batch_size},) or ({self.batch_size}, T)")
        if self.presence is None:
            if vocab_size is None:
                raise ValueError("vocab_size is required before the first call")
            self._ensure_presence(int(vocab_size))
        rows = np.broadcast_to(np.arange(self.batch_size)[:, None], ids.shape)
        keep = ids >= 0
        self.presence[rows[keep], ids[keep]] = True

    def reset(self) -> None:
        """Forget the presence history (the random stream continues)."""
        self.presence = None

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits)
        if x.ndim != 2 or x.shape[0] != self.batch_size:
            raise ValueError(f"logits must have shape ({self.batch_size}, V), got {x.shape}")
        presence = self._ensure_presence(x.shape[1])
        if self.params.is_greedy:
            ids = np.argmax(x, axis=-1).astype(np.int64)
        else:
            probs = filtered_probs(x, self.params, presence)
            cdf = np.cumsum(probs, axis=-1)
            # u < cdf[:, -1] strictly, so the first index with cdf > u exists and has p > 0.
            u = self.rng.random(self.batch_size) * cdf[:, -1]
            ids = np.sum(cdf <= u[:, None], axis=-1).astype(np.int64)
            ids = np.minimum(ids, x.shape[1] - 1)
        presence[np.arange(self.batch_size), ids] = True
        return ids


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and the `top` most likely tokens' (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprobs:
    """Log-probabilities from the raw logits (V,), before penalties and filters (what vLLM reports by
    default: the model's distribution, not the one the token was drawn from)."""
    x = np.asarray(logits, dtype=np.float64)
    logp = x - (np.max(x) + np.log(np.sum(np.exp(x - np.max(x)))))
    best = np.argsort(-logp, kind="stable")[:top] if top > 0 else ()
    return TokenLogprobs(int(token), float(logp[token]), tuple((int(i), float(logp[i])) for i in best))
