"""Torch side of ``dualbrain::CausalConv1d`` (and ``dualbrain::CausalConv1dWindow``).

Eagerly computes the Qwen3.5 Gated DeltaNet short convolution exactly like transformers
(``causal_conv1d_fn`` for prefill, ``causal_conv1d_update`` for decode): the input is cast to the
weight's dtype, convolved depthwise over [conv_state, x] and passed through SiLU, then cast back.
Under ``torch.onnx.export(..., dynamo=True)`` it emits ONE node of domain ``dualbrain``
(inputs x, weight, conv_state; attribute ``channels`` = C) whose semantics are given by
:mod:`.function` (ONNX Runtime) and :mod:`.reference` (NumPy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "causal_conv1d"]

from .reference import DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION


def _eager(x, weight, conv_state, window: bool):
    B, T, C = x.shape
    K = weight.shape[-1]
    xc = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (B, C, T+K-1)
    y = F.conv1d(xc.to(weight.dtype), weight.unsqueeze(1), None, padding=0, groups=C)  # (B, C, T)
    y = F.silu(y).to(x.dtype).transpose(1, 2).contiguous()
    new_state = xc[:, :, T:].contiguous()
    if not window:
        return y, new_state
    states = xc.unfold(2, K - 1, 1)[:, :, 1:]  # (B, C, T, K-1): window starting at t+1
    return y, new_state, states.permute(0, 2, 1, 3).contiguous()


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, window: bool = False):
    """Causal depthwise conv1d + SiLU with carried state.

    x: (B, T, C) channels-last pre-conv inputs; weight: (C, K) (``conv1d.weight.squeeze(1)``);
    conv_state: (B, C, K-1), the last K-1 pre-conv inputs (zeros initially).
    Returns (y (B, T, C), new_state (B, C, K-1)); with ``window`` also
    states (B, T, C, K-1), the conv state after each position.  Outputs have x's dtype.
    """
    if weight.dim() == 3:  # tolerate the checkpoint layout (C, 1, K)
        weight = weight.squeeze(1)
    C, K = int(weight.shape[0]), int(weight.shape[1])
    if torch.onnx.is_in_onnx_export():
        B, T = x.shape[0], x.shape[1]
        dtypes = [x.dtype, x.dtype]
        shapes = [[B, T, C], [B, C, K - 1]]
        if window:
            dtypes.append(x.dtype)
            shapes.append([B, T, C, K - 1])
        outs = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{OP_TYPE_WINDOW if window else OP_TYPE}",
            [x, weight, conv_state],
            attrs={"channels": C},
            dtypes=dtypes,
            shapes=shapes,
            version=VERSION,
        )
        return tuple(outs)
    return _eager(x, weight, conv_state, bool(window))
