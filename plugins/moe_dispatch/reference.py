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
# The same op on 4- and 8-bit experts, eight rows interleaved (`interleave_int4_rows`, `interleave_int8_rows`):
# the CPU kernels' op types only. The export writes MoEDispatch over DequantizeLinear; the ONNX Runtime
# backend rewrites it at load.
INT4_OP_TYPE = "Int4MoEDispatch"
INT8_OP_TYPE = "Int8MoEDispatch"
INT4_BLOCK = 32          # values per scale in those layouts
# Int4MoEDispatch with the layer's shared expert as one more expert every token goes to (`quant_shared_moe_dispatch`);
# rewritten at load from the exporter's shared-expert nodes.
INT4_SHARED_OP_TYPE = "Int4SharedMoEDispatch"

__all__ = ["IDENTITY", "DOMAIN", "OP_TYPE", "VERSION", "INT4_OP_TYPE", "INT8_OP_TYPE", "INT4_BLOCK", "route",
           "moe_dispatch", "interleave_gate_up", "deinterleave_gate_up", "interleave_int4_rows", "int4_rows",
           "interleave_int8_rows", "int8_rows", "layout_rows", "interleave_scales", "quant_moe_dispatch",
           "INT4_SHARED_OP_TYPE", "shared_expert", "quant_shared_moe_dispatch"]


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


def interleave_int4_rows(packed, scales):
    """QMoE's 4-bit experts -> eight rows interleaved, the layout of ``Int4MoEDispatch``.

    In: packed [E, R, K/2] uint8 (value 2j in the low nibble of byte j, the mid zero point 8), scales
    [E, R, K/32]. Out: [E, R/8, K/32, 128] uint8 and [E, R/8, K/32, 8] scales (`interleave_scales`): for each
    group of eight rows and each block of 32 values, four chunks of 32 bytes; byte 4r+i of chunk c holds row r's
    value 8c+i in its low nibble and 8c+4+i in its high one. One 32-byte load then gives each of eight 32-bit
    lanes four values of its own row, so the kernel's per-block scale, convert and FMA serve eight rows
    (llama.cpp repacks Q4_0 the same way)."""
    packed = np.asarray(packed, np.uint8)
    e, rows, half = packed.shape
    k = 2 * half
    if rows % 8 or k % INT4_BLOCK:
        raise ValueError(f"rows ({rows}) must be a multiple of 8 and K ({k}) of {INT4_BLOCK}")
    # Four bytes of a row, read as one little-endian word, hold its values 8c..8c+7 as nibbles in order;
    # the lane wants them as v0 v4 v1 v5 v2 v6 v3 v7. Two swaps do it (the middle bytes, then the middle
    # nibbles of each half), then the words are moved from row-major to chunk-major order.
    x = np.ascontiguousarray(packed).view("<u4").reshape(e, rows // 8, 8, k // INT4_BLOCK, 4)
    x = (x & 0xFF0000FF) | ((x & 0x00FF0000) >> 8) | ((x & 0x0000FF00) << 8)
    x = (x & 0xF00FF00F) | ((x & 0x0F000F00) >> 4) | ((x & 0x00F000F0) << 4)
    w = np.ascontiguousarray(x.transpose(0, 1, 3, 4, 2)).view(np.uint8).reshape(e, rows // 8, k // INT4_BLOCK, 128)
    return w, interleave_scales(scales)


def interleave_scales(scales):
    """Per-block scales [E, R, K/32] -> [E, R/8, K/32, 8], the eight rows of a group side by side (the
    scales of every interleaved layout): float16 where every scale is exactly a float16 (as the exporter
    stores them, `exporter.quantize.stored_scale_dtype`), else float32. Why: at blocks of 32, float32 scales
    are a fifth of a 4-bit layout's bytes; float16 ones make a batch-8 decode step, which reads its experts
    from memory, read 10 % fewer bytes for the same products (the kernels widen them exactly)."""
    e, rows, blocks = np.shape(scales)
    s = np.asarray(scales, np.float32).reshape(e, rows // 8, 8, blocks).transpose(0, 1, 3, 2)
    return exact_float16(np.ascontiguousarray(s))     # contiguous first: astype keeps a view's order


def exact_float16(a: np.ndarray) -> np.ndarray:
    """float32 `a` as float16 when that holds every value exactly (widening gives them back), else `a`."""
    with np.errstate(over="ignore"):
        half = a.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), a) else a


def int4_rows(w, s):
    """The float32 rows [E, R, K] of `interleave_int4_rows`' layout, read back from it."""
    w, s = np.asarray(w, np.uint8), np.asarray(s, np.float32)
    e, groups, blocks, _ = w.shape
    b = w.reshape(e, groups, blocks, 4, 8, 4)                       # expert, group, block, chunk, row, byte
    v = np.concatenate([b & 0x0F, b >> 4], axis=-1)                 # ..., chunk, row, value 8c + 0..7
    v = v.transpose(0, 1, 4, 2, 3, 5).reshape(e, groups * 8, blocks, INT4_BLOCK)
    scale = s.transpose(0, 1, 3, 2).reshape(e, groups * 8, blocks, 1)
    return ((v.astype(np.float32) - 8) * scale).reshape(e, groups * 8, blocks * INT4_BLOCK)


def interleave_int8_rows(q, scales):
    """QMoE's 8-bit experts -> eight rows interleaved, the layout of ``Int8MoEDispatch``.

    In: q [E, R, K] uint8 (the mid zero point 128), scales [E, R, K/32]. Out: [E, R/8, K/32, 256] uint8 and
    [E, R/8, K/32, 8] scales (`interleave_scales`): for each group of eight rows and each block of 32 values,
    eight chunks of 32 bytes; byte 4r+i of chunk c holds row r's value 4c+i, so one 32-byte load gives each
    32-bit lane four values of its own row (as :func:`interleave_int4_rows`, without the nibbles)."""
    q = np.asarray(q, np.uint8)
    e, rows, k = q.shape
    if rows % 8 or k % INT4_BLOCK:
        raise ValueError(f"rows ({rows}) must be a multiple of 8 and K ({k}) of {INT4_BLOCK}")
    # four bytes of a row (values 4c..4c+3) stay together: move them as one 32-bit word
    words = np.ascontiguousarray(q).view("<u4").reshape(e, rows // 8, 8, k // INT4_BLOCK, 8)
    w = np.ascontiguousarray(words.transpose(0, 1, 3, 4, 2))               # e, group, block, chunk, row
    return w.view(np.uint8).reshape(e, rows // 8, k // INT4_BLOCK, 256), interleave_scales(scales)


def int8_rows(w, s):
    """The float32 rows [E, R, K] of `interleave_int8_rows`' layout, read back from it."""
    w, s = np.asarray(w, np.uint8), np.asarray(s, np.float32)
    e, groups, blocks, _ = w.shape
    v = w.reshape(e, groups, blocks, 8, 8, 4).transpose(0, 1, 4, 2, 3, 5).reshape(e, groups * 8, blocks, INT4_BLOCK)
    scale = s.transpose(0, 1, 3, 2).reshape(e, groups * 8, blocks, 1)
    return ((v.astype(np.float32) - 128) * scale).reshape(e, groups * 8, blocks * INT4_BLOCK)


def quant_moe_dispatch(x, router_logits, fc1, fc1_scales, fc2, fc2_scales, top_k: int, normalize: bool = True):
    """``Int4MoEDispatch`` / ``Int8MoEDispatch`` (told apart by the layout's bytes a block, 128 or 256):
    :func:`moe_dispatch` over the experts read back from their interleaved layout (the kernels round the
    activations to int8 per block of 32 first, which this reference does not)."""
    return moe_dispatch(x, router_logits, layout_rows(fc1, fc1_scales), layout_rows(fc2, fc2_scales), top_k, normalize)


def layout_rows(w, s):
    """The float32 rows [E, R, K] of either interleaved layout (told apart by its bytes a block, 128 or 256)."""
    return (int4_rows if np.shape(w)[-1] == 128 else int8_rows)(w, s)


def shared_expert(x, gate, up, down, shared_gate):
    """Qwen3.5-MoE's shared expert: sigmoid(x . shared_gate) * down @ (silu(gate @ x) * (up @ x)); gate, up
    [I, H], down [H, I], shared_gate [1, H] (the export's linears, [out, in]). Float32."""
    xf = np.asarray(x, np.float32)
    act = _silu(xf @ np.asarray(gate, np.float32).T) * (xf @ np.asarray(up, np.float32).T)
    weight = 1.0 / (1.0 + np.exp(-(xf @ np.asarray(shared_gate, np.float32).T)))
    return weight * (act @ np.asarray(down, np.float32).T)


def quant_shared_moe_dispatch(x, router_logits, fc1, fc1_scales, fc2, fc2_scales, shared_fc1, shared_fc1_scales,
                              shared_fc2, shared_fc2_scales, shared_gate, top_k: int, normalize: bool = True):
    """``Int4SharedMoEDispatch``: :func:`quant_moe_dispatch` plus :func:`shared_expert`, the shared expert one expert
    ([1, ...]) in the routed experts' layout (gate and up rows interleaved), read back from it."""
    gate_up, down = layout_rows(shared_fc1, shared_fc1_scales)[0], layout_rows(shared_fc2, shared_fc2_scales)[0]
    routed = quant_moe_dispatch(x, router_logits, fc1, fc1_scales, fc2, fc2_scales, top_k, normalize)
    return routed + shared_expert(x, gate_up[0::2], gate_up[1::2], down, shared_gate)
