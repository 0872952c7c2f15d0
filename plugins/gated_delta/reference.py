"""NumPy reference of ``dualbrain::GatedDeltaRule`` / ``dualbrain::GatedDeltaRuleWindow``.

Per value head h (using q/k head h // (Hv // Hk)), per position t, with S of shape (dk, dv):
    S <- exp(g) * S;  delta = beta * (v - S^T k);  S <- S + k delta^T;  o = S^T q
q and k are expected L2-normalised, q already scaled by dk**-0.5 (no scaling here).
Computed in float64, returned in float32.
"""
from __future__ import annotations

import numpy as np

from dualbrain.plugins import OpIdentity

__all__ = ["IDENTITY", "DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "MIXER_OP_TYPE", "MIXER_RAW_OP_TYPE",
           "gated_delta_rule", "gated_delta_mixer", "random_inputs", "l2_normalise"]

# Node identity, read by op.py (torch), function.py (onnx) and trt.py (TensorRT).
IDENTITY = OpIdentity("GatedDeltaRule", window_op_type="GatedDeltaRuleWindow")
DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION = (IDENTITY.domain, IDENTITY.op_type, IDENTITY.window_op_type,
                                            IDENTITY.version)
# The CPU kernels' fused form (runtime.backends.ort_kernels): a GDN layer's conv, q/k norms, this rule and the
# gated output norm in one node.
MIXER_OP_TYPE = "GatedDeltaMixer"
MIXER_RAW_OP_TYPE = "GatedDeltaMixerRawGates"    # the same with the gates' nodes folded in (gate_params below)


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


def gated_delta_mixer(qkv, conv_weight_t, conv_state, z, g, beta, state, q_scale, k_scale, norm, eps,
                      num_k_heads: int, gate_params=None):
    """``GatedDeltaMixer``: a GDN layer's mixer from its projections' outputs to what its output projection
    reads, as the exported graph computes it. qkv (B, T, 2 Hk dk + Hv dv) -> silu(causal conv)
    (causal_conv.reference; conv_weight_t is the conv weight transposed, (K, C), as the kernel takes it) ->
    split into q, k (B, T, Hk, dk) and v (B, T, Hv, dv); q and k each x / sqrt(mean(x^2) + eps) * scale (ONNX's
    SimplifiedLayerNormalization; scales (dk,)) -> this rule -> its output normalised the same way (norm (dv,))
    times silu(z) (z (B, T, Hv dv)). eps: (q's, k's, the output norm's). With ``gate_params`` (2, Hv) =
    (dt_bias, A) (``GatedDeltaMixerRawGates``), g and beta are the raw projections a and b:
    g = -A softplus(a + dt_bias) (torch's softplus: past 20, x itself) and beta = sigmoid(b).
    Returns (y (B, T, Hv, dv), new conv_state (B, C, K-1), new state (B, Hv, dk, dv))."""
    from dualbrain.plugins.causal_conv.reference import causal_conv1d

    y, new_conv = causal_conv1d(np.asarray(qkv, np.float32), np.asarray(conv_weight_t).T, conv_state)
    B, T, _ = y.shape
    Hv, dk, dv = state.shape[1:]
    split = num_k_heads * dk
    assert y.shape[2] == 2 * split + Hv * dv, (y.shape, num_k_heads, state.shape)

    def norm_(x, scale, e):
        x = np.asarray(x, np.float64)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + e) * np.asarray(scale, np.float64)

    q = norm_(y[..., :split].reshape(B, T, num_k_heads, dk), q_scale, eps[0])
    k = norm_(y[..., split:2 * split].reshape(B, T, num_k_heads, dk), k_scale, eps[1])
    if gate_params is not None:
        x = np.asarray(g, np.float64) + np.asarray(gate_params[0], np.float64)
        g = -np.asarray(gate_params[1], np.float64) * np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))
        beta = 1.0 / (1.0 + np.exp(-np.asarray(beta, np.float64)))
    o, new_state = gated_delta_rule(q, k, y[..., 2 * split:].reshape(B, T, Hv, dv), g, beta, state)
    zh = np.asarray(z, np.float64).reshape(B, T, Hv, dv)
    out = norm_(o, norm, eps[2]) * zh / (1.0 + np.exp(-zh))
    return out.astype(np.float32), new_conv, new_state


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
