"""NumPy reference of ``dualbrain.cpu::Int4MatMul``: y[..., N] = x[..., K] @ W, W [K, N] the export's
signed blockwise int4 weight (DequantizeLinear along K, blocks of 32, no zero point), laid out as
`moe_dispatch.reference.interleave_int4_rows` lays out one expert: w [N/8, K/32, 128] uint8, scales
[N/8, K/32, 8] float16 or float32 (`interleave_scales`). Computed in float32; the kernel rounds x to int8 per
block of 32 first (as MatMulNBits does at accuracy level 4), which `int4_matmul` does not and `int8_activations`
does."""
from __future__ import annotations

import numpy as np

from dualbrain.plugins.moe_dispatch.reference import INT4_BLOCK, int4_rows, interleave_scales

OP_TYPE = "Int4MatMul"


def interleave_linear(packed: bytes | np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The export's INT4 q [K, N] (its raw bytes: element (k, n) at k N + n, the even one in the low
    nibble, two's complement) and scale [K/32, N] -> (w [N/8, K/32, 128] with the mid zero point 8,
    scales [N/8, K/32, 8]).

    Byte (g, b, c, 4r + i) holds row 8g + r's values 32b + 8c + i (low nibble) and 32b + 8c + 4 + i
    (high), so this is one unpack, one pairing of the two halves of each chunk and one transpose."""
    scale = np.asarray(scale, np.float32)
    blocks, n = scale.shape
    k = blocks * INT4_BLOCK
    if n % 8:
        raise ValueError(f"N ({n}) must be a multiple of 8")
    b = np.frombuffer(packed, np.uint8) if isinstance(packed, (bytes, bytearray, memoryview)) \
        else np.asarray(packed, np.uint8)
    if b.size != k * n // 2:
        raise ValueError(f"{b.size} bytes do not hold a [{k}, {n}] int4 weight")
    b = b ^ 0x88                                         # signed nibble v -> v + 8 (mod 16): the mid zero point
    # n is a multiple of 8, so each byte holds two neighbours along N: (k, n) and (k, n + 1)
    v = np.empty((k, n), np.uint8)
    v[:, 0::2] = (b & 0x0F).reshape(k, n // 2)
    v[:, 1::2] = (b >> 4).reshape(k, n // 2)
    v = v.reshape(blocks, 4, 2, 4, n // 8, 8)            # block, chunk, half, i, group, row
    w = (v[:, :, 0] | (v[:, :, 1] << 4)).transpose(3, 0, 1, 4, 2)   # group, block, chunk, row, i
    return np.ascontiguousarray(w).reshape(n // 8, blocks, 128), interleave_scales(scale.T[None])[0]


def int4_matmul(x: np.ndarray, w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    weight = int4_rows(np.asarray(w)[None], np.asarray(scales)[None])[0]      # [N, K]
    return (np.asarray(x, np.float32) @ weight.T).astype(np.float32)


def int8_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., K] -> (q [..., K] int8, scales [..., K/32] float32), as the quantized CPU kernels round their
    activations (quant_blocks.h's int8_blocks), to the bit: per block of 32, scale max |x| / 127 (1 for a block
    of zeros; NaN ignored), q = x / scale rounded to the nearest, ties to even, in float32 throughout."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, INT4_BLOCK)
    mx = np.fmax.reduce(np.abs(blocks), axis=-1, initial=np.float32(0))     # fmax: NaN ignored
    scale = np.where(mx > 0, mx / np.float32(127), np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / scale)[..., None]
    with np.errstate(invalid="ignore"):
        q = np.rint(blocks * inv).astype(np.int8).reshape(x.shape)
    return q, scale
