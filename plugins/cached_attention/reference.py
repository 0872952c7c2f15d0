"""NumPy reference of ``dualbrain.cpu::CachedAttention``: the ONNX `Attention` node the exporter writes for a
full-attention layer (exporter.blocks.layers.GatedAttentionMixer), with its K/V as they reach it, the
runtime's sequence-major cache and the call's own rows apart:

    q [B, Hq, S, D]; past_key, past_value [P, B, Hkv, D]; new_key, new_value [S, B, Hkv, D];
    mask [B, 1, S, P + S] bool (True: attend)  ->  [B, Hq, S, D]

i.e. Attention(q, Transpose(Concat(past, new), [1, 2, 0, 3]) for K and V, mask, scale): query head h reads K/V
head h // (Hq / Hkv); softmax(scale q k^T over the visible keys) v. A query that sees no key gives zeros (the
exporter's mask always shows a query itself). Computed in float64, returned in float32."""
from __future__ import annotations

import numpy as np

OP_TYPE = "CachedAttention"


def cached_attention(q, past_key, new_key, past_value, new_value, mask, scale: float | None = None) -> np.ndarray:
    """`scale` None: the op's default, 1 / sqrt(D)."""
    q, pk, nk, pv, nv = (np.asarray(a, np.float64) for a in (q, past_key, new_key, past_value, new_value))
    b, hq, s, d = q.shape
    hkv = pk.shape[2]
    assert hq % hkv == 0 and nk.shape == (s, b, hkv, d) and mask.shape == (b, 1, s, pk.shape[0] + s), \
        (q.shape, pk.shape, nk.shape, mask.shape)
    key = np.repeat(np.concatenate([pk, nk]).transpose(1, 2, 0, 3), hq // hkv, axis=1)     # (B, Hq, T, D)
    value = np.repeat(np.concatenate([pv, nv]).transpose(1, 2, 0, 3), hq // hkv, axis=1)
    scores = np.where(mask, q @ key.transpose(0, 1, 3, 2) * (d ** -0.5 if scale is None else scale), -np.inf)
    top = scores.max(-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0))
    total = weights.sum(-1, keepdims=True)
    return (weights @ value / np.where(total > 0, total, 1)).astype(np.float32)
