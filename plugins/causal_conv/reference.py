"""NumPy reference of ``dualbrain::CausalConv1d`` / ``dualbrain::CausalConv1dWindow``.

y = silu(depthwise causal conv over the time concatenation [conv_state, x]) (no bias), computed in
float64 and rounded to x's dtype; new_state = the last K-1 columns of that concatenation.
"""
from __future__ import annotations

import numpy as np

from dualbrain.plugins import OpIdentity

__all__ = ["IDENTITY", "DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "causal_conv1d"]

# Node identity, read by op.py (torch), function.py (onnx) and trt.py (TensorRT).
IDENTITY = OpIdentity("CausalConv1d", window_op_type="CausalConv1dWindow")
DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION = (IDENTITY.domain, IDENTITY.op_type, IDENTITY.window_op_type,
                                            IDENTITY.version)


def causal_conv1d(x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray, window: bool = False):
    """x: (B, T, C); weight: (C, K); conv_state: (B, C, K-1).

    Returns (y (B, T, C), new_state (B, C, K-1)) and, with ``window``, also
    states (B, T, C, K-1): the conv state after each position (states[:, -1] == new_state).
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    conv_state = np.asarray(conv_state)
    B, T, C = x.shape
    Cw, K = weight.shape
    assert Cw == C and K >= 2, (x.shape, weight.shape)
    assert conv_state.shape == (B, C, K - 1), (conv_state.shape, (B, C, K - 1))
    dt = x.dtype
    xc = np.concatenate([conv_state.astype(dt), np.transpose(x, (0, 2, 1))], axis=2)  # (B, C, T+K-1)
    xc64 = xc.astype(np.float64)
    w64 = weight.astype(dt).astype(np.float64)
    acc = np.zeros((B, C, T), np.float64)
    for j in range(K):
        acc += w64[None, :, j, None] * xc64[:, :, j:j + T]
    y = acc / (1.0 + np.exp(-acc))
    y = np.ascontiguousarray(np.transpose(y, (0, 2, 1))).astype(dt)
    new_state = np.ascontiguousarray(xc[:, :, T:])
    if not window:
        return y, new_state
    idx = np.arange(1, T + 1)[:, None] + np.arange(K - 1)[None, :]  # (T, K-1)
    states = np.ascontiguousarray(np.transpose(xc[:, :, idx], (0, 2, 1, 3)))  # (B, T, C, K-1)
    return y, new_state, states
