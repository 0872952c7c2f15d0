"""NumPy reference of ``dualbrain.cpu::Int8MatMul``: y[..., N] = x[..., K] @ W with
W[k, n] = (b[n, k // block, k % block] - 128) * scales[n * (K // block) + k // block] -- the export's
signed blockwise int8 weight (DequantizeLinear, axis 0 of [K, N]) laid out as com.microsoft.MatMulNBits'
8-bit B (one row per output, the implicit zero point 128). Computed in float32; the kernel rounds x to
int16 per token first (within 2^-15 of each token's largest value), which this reference does not."""
from __future__ import annotations

import numpy as np

OP_TYPE = "Int8MatMul"


def to_rows(q: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The export's int8 q [K, N] and scale [K / block, N] -> (b [N, K / block, block] uint8,
    scales [N * K / block])."""
    k, n = q.shape
    b = (q.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)
    return np.ascontiguousarray(b), np.ascontiguousarray(scale.T.astype(np.float32)).reshape(-1)


def int8_matmul(x: np.ndarray, b: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n, blocks, block = b.shape
    w = (b.astype(np.float32) - 128).reshape(n, blocks * block) * np.repeat(scales.reshape(n, blocks), block, axis=1)
    return (np.asarray(x, np.float32) @ w.T).astype(np.float32)
