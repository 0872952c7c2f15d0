"""Torch side of ``dualbrain::GatedDeltaRule`` (and ``dualbrain::GatedDeltaRuleWindow``).

Eagerly runs the gated delta rule recurrence (a simple loop over T, float32), equal to transformers'
``torch_recurrent_gated_delta_rule`` / ``torch_chunk_gated_delta_rule`` called with already
L2-normalised q/k and q pre-scaled by dk**-0.5.  Under ``torch.onnx.export(..., dynamo=True)`` it
emits ONE node of domain ``dualbrain`` (inputs q, k, v, g, beta, state; int attributes
``num_k_heads`` = Hk, ``num_v_heads`` = Hv) whose semantics are given by :mod:`.function`
(ONNX Runtime) and :mod:`.reference` (NumPy).
"""
from __future__ import annotations

import torch

from .reference import DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "gated_delta_rule"]


def _eager(q, k, v, g, beta, state, window: bool):
    B, T, Hk, dk = k.shape
    Hv = v.shape[2]
    r = Hv // Hk
    f32 = torch.float32
    if r != 1:
        q = q.repeat_interleave(r, dim=2)
        k = k.repeat_interleave(r, dim=2)
    q, k, v, g, beta = (a.to(f32) for a in (q, k, v, g, beta))
    S = state.to(f32)
    outs, states = [], []
    for t in range(T):
        S = S * g[:, t].exp()[:, :, None, None]
        kt = k[:, t]  # (B, Hv, dk)
        kv = (S * kt.unsqueeze(-1)).sum(dim=-2)  # (B, Hv, dv)
        delta = (v[:, t] - kv) * beta[:, t].unsqueeze(-1)
        S = S + kt.unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append((S * q[:, t].unsqueeze(-1)).sum(dim=-2))
        if window:
            states.append(S)
    if T:
        o = torch.stack(outs, dim=1)
    else:
        o = v.new_zeros(v.shape, dtype=f32)
    if not window:
        return o, S
    st = torch.stack(states, dim=1) if T else S.new_zeros((B, 0) + tuple(S.shape[1:]))
    return o, S, st


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, window: bool = False):
    """Gated delta rule over a block of T positions (float32).

    q, k: (B, T, Hk, dk), L2-normalised, q already scaled by dk**-0.5; v: (B, T, Hv, dv);
    g: (B, T, Hv) log-decay (<= 0); beta: (B, T, Hv); state: (B, Hv, dk, dv); Hv % Hk == 0 and value
    head h uses q/k head h // (Hv // Hk).
    Returns (o (B, T, Hv, dv), new_state (B, Hv, dk, dv)); with ``window`` also
    states (B, T, Hv, dk, dv), the state after each position.
    """
    Hk, Hv = int(k.shape[2]), int(v.shape[2])
    if Hv % Hk:
        raise ValueError(f"num_v_heads {Hv} is not a multiple of num_k_heads {Hk}")
    if torch.onnx.is_in_onnx_export():
        B, T = v.shape[0], v.shape[1]
        dk, dv = state.shape[2], state.shape[3]
        dtypes = [torch.float32, torch.float32]
        shapes = [[B, T, Hv, dv], [B, Hv, dk, dv]]
        if window:
            dtypes.append(torch.float32)
            shapes.append([B, T, Hv, dk, dv])
        outs = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{OP_TYPE_WINDOW if window else OP_TYPE}",
            [q, k, v, g, beta, state],
            attrs={"num_k_heads": Hk, "num_v_heads": Hv},
            dtypes=dtypes,
            shapes=shapes,
            version=VERSION,
        )
        return tuple(outs)
    return _eager(q, k, v, g, beta, state, bool(window))
