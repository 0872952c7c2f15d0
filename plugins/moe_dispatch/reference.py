"""NumPy reference for the ``dualbrain::MoEDispatch`` op (Qwen3.5-MoE routed experts).

Routing follows ``Qwen3_5MoeTopKRouter`` exactly: softmax over *all* experts in float32, top-k
(ties broken towards the lower expert index, as ONNX ``TopK``), then -- when ``normalize`` -- the
k weights are renormalised to sum to 1.  The routing weights are rounded to the model dtype (as the
router does) before the combine.  Expert ``e`` computes ``fc2[e] @ (silu(gate) * up)`` where
``fc1[e]`` holds gate and up rows interleaved (row 2i = gate row i, row 2i+1 = up row i), the
``com.microsoft.MoE`` ``swiglu_fusion=1`` layout.  Arithmetic is done in float32; the result is
returned in ``x.dtype``.
"""
from __future__ import annotations

import numpy as np

from dualbrain.plugins import OpIdentity

# Node identity, read by op.py (torch), function.py (onnx) and trt.py (TensorRT).
IDENTITY = OpIdentity("MoEDispatch")
DOMAIN, OP_TYPE, VERSION = IDENTITY.domain, IDENTITY.op_type, IDENTITY.version

__all__ = ["IDENTITY", "DOMAIN", "OP_TYPE", "VERSION", "route", "moe_dispatch", "interleave_gate_up", "deinterleave_gate_up"]


def interleave_gate_up(gate_up):
    """[E, 2I, H] stacked (all gate rows, then all up rows; transformers' ``gate_up_proj``)
    -> [E, 2I, H] interleaved (row 2i = gate i, row 2i+1 = up i)."""
    gate_up = np.asarray(gate_up)
    E, two_i, H = gate_up.shape
    assert two_i % 2 == 0, gate_up.shape
    i = two_i // 2
    return np.ascontiguousarray(
        gate_up.reshape(E, 2, i, H).transpose(0, 2, 1, 3).reshape(E, two_i, H))


def deinterleave_gate_up(fc1):
    """Inverse of :func:`interleave_gate_up`: interleaved [E, 2I, H] -> stacked [gate | up]."""
    fc1 = np.asarray(fc1)
    E, two_i, H = fc1.shape
    assert two_i % 2 == 0, fc1.shape
    i = two_i // 2
    return np.ascontiguousarray(
        fc1.reshape(E, i, 2, H).transpose(0, 2, 1, 3).reshape(E, two_i, H))


def route(router_logits, top_k: int, normalize: bool = True):
    """Return (weights [N, k] float32, indices [N, k] int64) as Qwen3_5MoeTopKRouter computes them."""
    logits = np.asarray(router_logits).astype(np.float32)
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    probs = e / e.sum(axis=-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(probs, idx, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return w.astype(np.float32), idx.astype(np.int64)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def moe_dispatch(x, router_logits, fc1, fc2, top_k: int, normalize: bool = True):
    """y[N, H] = sum_{e in topk} w_e * fc2[e] @ (silu(gate_e(x)) * up_e(x))."""
    x = np.asarray(x)
    dtype = x.dtype
    w, idx = route(router_logits, top_k, normalize)
    w = w.astype(dtype).astype(np.float32)  # router returns weights in the model dtype
    xf = x.astype(np.float32)
    fc1f = np.asarray(fc1).astype(np.float32)
    fc2f = np.asarray(fc2).astype(np.float32)
    N, H = xf.shape
    y = np.zeros((N, H), np.float32)
    for e in np.unique(idx):
        tok, slot = np.nonzero(idx == e)
        h = xf[tok] @ fc1f[e].T  # [n, 2I], interleaved
        gate, up = h[:, 0::2], h[:, 1::2]
        out = (_silu(gate) * up) @ fc2f[e].T  # [n, H]
        np.add.at(y, tok, out * w[tok, slot][:, None])
    return y.astype(dtype)
