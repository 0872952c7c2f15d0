"""Torch side of ``dualbrain::MoEDispatch``.

Eagerly computes the Qwen3.5-MoE routed-expert output (``Qwen3_5MoeTopKRouter`` +
``Qwen3_5MoeExperts``, shared expert excluded).  Under ``torch.onnx.export(..., dynamo=True)``
it emits a single ONNX node ``dualbrain::MoEDispatch`` (inputs x, router_logits, fc1, fc2;
attributes top_k, normalize) whose semantics are given by :mod:`.function` (ONNX Runtime) and
:mod:`.reference` (NumPy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DOMAIN", "OP_TYPE", "VERSION", "moe_dispatch", "route",
           "interleave_gate_up", "deinterleave_gate_up"]

from .reference import DOMAIN, OP_TYPE, VERSION


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] stacked ([all gate rows | all up rows], transformers' ``gate_up_proj``)
    -> [E, 2I, H] interleaved (row 2i = gate row i, row 2i+1 = up row i)."""
    E, two_i, H = gate_up.shape
    assert two_i % 2 == 0, tuple(gate_up.shape)
    return gate_up.reshape(E, 2, two_i // 2, H).transpose(1, 2).reshape(E, two_i, H).contiguous()


def interleave_gate_up_(gate_up: torch.Tensor) -> torch.Tensor:
    """In-place `interleave_gate_up`, one expert at a time: extra memory is one expert, not a copy of all."""
    for e in range(gate_up.shape[0]):
        gate_up[e] = interleave_gate_up(gate_up[e:e + 1])[0]
    return gate_up


def deinterleave_gate_up(fc1: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up`."""
    E, two_i, H = fc1.shape
    assert two_i % 2 == 0, tuple(fc1.shape)
    return fc1.reshape(E, two_i // 2, 2, H).transpose(1, 2).reshape(E, two_i, H).contiguous()


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = True):
    """(weights [N, k] in the logits' dtype, indices [N, k]) exactly as Qwen3_5MoeTopKRouter."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(router_logits.dtype), idx


def _eager(x, router_logits, fc1, fc2, top_k: int, normalize: bool):
    w, idx = route(router_logits, top_k, normalize)
    w = w.to(x.dtype)
    y = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        h = F.linear(x[tok], fc1[e])  # [n, 2I], gate/up interleaved
        h = F.silu(h[:, 0::2]) * h[:, 1::2]
        out = F.linear(h, fc2[e]) * w[tok, slot, None]
        y.index_add_(0, tok, out.to(y.dtype))
    return y


def moe_dispatch(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                 top_k: int, normalize: bool = True) -> torch.Tensor:
    """Routed MoE output y[N, H].

    x: [N, H]; router_logits: [N, E] raw router logits (``x @ gate.weight.T``);
    fc1: [E, 2I, H] gate/up interleaved row by row (see :func:`interleave_gate_up`);
    fc2: [E, H, I]; top_k: python int; normalize: renormalise the top-k softmax weights
    (Qwen3.5-MoE's router always does).
    """
    top_k = int(top_k)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP_TYPE}",
            [x, router_logits, fc1, fc2],
            attrs={"top_k": top_k, "normalize": int(bool(normalize))},
            dtype=x.dtype,
            shape=x.shape,
            version=VERSION,
        )
    return _eager(x, router_logits, fc1, fc2, top_k, bool(normalize))
