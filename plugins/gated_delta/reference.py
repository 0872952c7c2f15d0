"""NumPy reference of ``dualbrain::GatedDeltaRule`` / ``dualbrain::GatedDeltaRuleWindow``.

Per value head h (using q/k head h // (Hv // Hk)), per position t, with S of shape (dk, dv):
    S <- exp(g) * S;  delta = beta * (v - S^T k);  S <- S + k delta^T;  o = S^T q
q and k are expected L2-normalised, q already scaled by dk**-0.5 (no scaling here).
Computed in float64, returned in float32.
"""
from __future__ import annotations

import numpy as np

from dualbrain.plugins import OpIdentity

__all__ = ["IDENTITY", "DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "gated_delta_rule", "random_inputs",
           "l2_normalise"]

# Node identity, read by op.py (torch), function.py (onnx) and trt.py (TensorRT).
IDENTITY = OpIdentity("GatedDeltaRule", window_op_type="GatedDeltaRuleWindow")
DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION = (IDENTITY.domain, IDENTITY.op_type, IDENTITY.window_op_type,
                                            IDENTITY.version)


def gated_delta_rule(q, k, v, g, beta, state, window: bool = False):
    """q, k: (B, T, Hk, dk); v: (B, T, Hv, dv); g, beta: (B, T, Hv); state: (B, Hv, dk, dv).

    Returns (o (B, T, Hv, dv), new_state (B, Hv, dk, dv)) and, with ``window``, also
    states (B, T, Hv, dk, dv): the state after each position.
    """
    q, k, v, g, beta, state = (np.asarray(a, dtype=np.float64) for a in (q, k, v, g, beta, state))
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[2], v.shape[3]
    assert q.shape == k.shape and Hv % Hk == 0, (q.shape, k.shape, v.shape)
    assert g.shape == (B, T, Hv) and beta.shape == (B, T, Hv) and state.shape == (B, Hv, dk, dv)
    r = Hv // Hk
    qh = np.repeat(q, r, axis=2)  # value head h uses qk head h // r
    kh = np.repeat(k, r, axis=2)
    S = state.copy()
    o = np.empty((B, T, Hv, dv), np.float64)
    states = np.empty((B, T, Hv, dk, dv), np.float64) if window else None
    for t in range(T):
        S = S * np.exp(g[:, t])[:, :, None, None]
        kt = kh[:, t]  # (B, Hv, dk)
        kv = np.einsum("bhk,bhkv->bhv", kt, S)
        delta = beta[:, t, :, None] * (v[:, t] - kv)
        S = S + kt[:, :, :, None] * delta[:, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", qh[:, t], S)
        if window:
            states[:, t] = S
    out = (o.astype(np.float32), S.astype(np.float32))
    if window:
        out = out + (states.astype(np.float32),)
    return out


def l2_normalise(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def random_inputs(rng, B, T, Hk, Hv, dk, dv):
    """float32 (q, k, v, g, beta, state) as the model feeds the op: unit-norm q and k (q also scaled
    by dk**-0.5), decays g in [-1.5, -0.005], beta in [0, 1]. For the tests and the benchmarks."""
    q = l2_normalise(rng.standard_normal((B, T, Hk, dk))) * dk ** -0.5
    k = l2_normalise(rng.standard_normal((B, T, Hk, dk)))
    v = rng.standard_normal((B, T, Hv, dv))
    g = -rng.uniform(0.005, 1.5, (B, T, Hv))
    beta = rng.uniform(0.0, 1.0, (B, T, Hv))
    state = rng.standard_normal((B, Hv, dk, dv)) * 0.5
    return [a.astype(np.float32) for a in (q, k, v, g, beta, state)]
