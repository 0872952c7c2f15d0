"""Triton kernel of ``dualbrain::CausalConv1d`` / ``dualbrain::CausalConv1dWindow``.

Same semantics as :mod:`.reference`: y = silu(depthwise causal conv over the time concatenation
[conv_state, x]) with no bias, new_state = the last K-1 columns of that concatenation and (window
variant) states[:, t] = the conv state after position t.  Inputs may be float32, float16 or bfloat16;
the weight and the incoming state are rounded to x's dtype (as the reference does) and the sum is
accumulated in float32; outputs have x's dtype.

Public API
----------
``causal_conv1d_triton(x, weight, conv_state, out_y, out_state, out_states=None)``
    Launch into preallocated torch tensors (e.g. TensorRT's output buffers wrapped as torch CUDA
    tensors).  Any strides are accepted.  ``out_state`` may alias ``conv_state`` (in-place state
    update): every program that reads the old state also writes the new one, after its reads.
``causal_conv1d(x, weight, conv_state, window=False)``
    Convenience wrapper that allocates and returns ``(y, new_state[, states])``.

Grid: (cdiv(C, BLOCK_C), cdiv(T, BLOCK_T), B).  Each program handles a (BLOCK_T, BLOCK_C) tile of y
(and of states); the time block 0 programs also write new_state for their channels.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["causal_conv1d", "causal_conv1d_triton", "causal_conv1d_kernel"]


@triton.jit
def causal_conv1d_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, ns_ptr, ss_ptr,
    T, C,
    sxb, sxt, sxc,
    swc, swk,
    ssb, ssc, ssk,
    syb, syt, syc,
    snb, snc, snk,
    sqb, sqt, sqc, sqk,
    K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, WINDOW: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = t < T
    xb = x_ptr + pid_b * sxb
    sb = s_ptr + pid_b * ssb
    dt = x_ptr.dtype.element_ty

    # The time concatenation [conv_state, x] is addressed by x-relative time u: u < 0 is state column
    # u + K-1.  (Loads are written out inline: a nested @jit helper is free on GPU but costs a lot
    # per call under TRITON_INTERPRET.)
    c2 = cols[None, :]
    mc2 = mask_c[None, :]
    x_c = xb + c2 * sxc
    s_c = sb + c2 * ssc
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        # y[t] uses concatenation columns t .. t+K-1, i.e. x-relative times t + j - (K-1)
        u = t[:, None] + (j - (K - 1))
        in_x = (u >= 0) & (u < T) & mc2
        xv = tl.load(x_c + u * sxt, mask=in_x, other=0.0)
        if j < K - 1:  # only the first K-1 rows of the first time block can reach the state
            in_s = (u < 0) & mc2
            xv = tl.where(in_x, xv, tl.load(s_c + (u + (K - 1)) * ssk, mask=in_s, other=0.0).to(dt))
        w = tl.load(w_ptr + cols * swc + j * swk, mask=mask_c, other=0.0).to(dt).to(tl.float32)
        acc += xv.to(tl.float32) * w[None, :]
    y = acc / (1.0 + tl.exp(-acc))
    m2 = mask_t[:, None] & mask_c[None, :]
    tl.store(y_ptr + pid_b * syb + t[:, None] * syt + cols[None, :] * syc,
             y.to(y_ptr.dtype.element_ty), mask=m2)

    if WINDOW:
        # states[t, :, i] = concatenation column t + 1 + i  ->  x-relative time t + 1 + i - (K-1)
        for i in tl.static_range(K - 1):
            u = t[:, None] + (1 + i - (K - 1))
            in_x = (u >= 0) & (u < T) & mc2
            in_s = (u < 0) & mc2
            sv = tl.where(in_x, tl.load(x_c + u * sxt, mask=in_x, other=0.0),
                          tl.load(s_c + (u + (K - 1)) * ssk, mask=in_s, other=0.0).to(dt))
            tl.store(ss_ptr + pid_b * sqb + t[:, None] * sqt + cols[None, :] * sqc + i * sqk,
                     sv.to(ss_ptr.dtype.element_ty), mask=m2)

    if pid_t == 0:
        # new_state[:, i] = concatenation column T + i  ->  x-relative time T + i - (K-1).
        # Loads of the old state (only when T < K-1) all happen before the stores: aliasing is safe.
        ii = tl.arange(0, KP)
        u = T + ii[:, None] - (K - 1)
        mk = (ii[:, None] < (K - 1)) & mc2
        in_x = (u >= 0) & mk
        in_s = (u < 0) & mk
        nv = tl.where(in_x, tl.load(x_c + u * sxt, mask=in_x, other=0.0),
                      tl.load(s_c + (u + (K - 1)) * ssk, mask=in_s, other=0.0).to(dt))
        tl.debug_barrier()
        tl.store(ns_ptr + pid_b * snb + ii[:, None] * snk + c2 * snc,
                 nv.to(ns_ptr.dtype.element_ty), mask=mk)


def _check(x, weight, conv_state):
    if weight.dim() == 3:  # tolerate the checkpoint layout (C, 1, K)
        weight = weight.squeeze(1)
    B, T, C = x.shape
    Cw, K = weight.shape
    if Cw != C or K < 2:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    if tuple(conv_state.shape) != (B, C, K - 1):
        raise ValueError(f"conv_state {tuple(conv_state.shape)} != {(B, C, K - 1)}")
    return weight, B, T, C, K


def causal_conv1d_triton(x, weight, conv_state, out_y, out_state, out_states=None, *,
                         block_t: int = 32, block_c: int = 128, num_warps: int = 4):
    """Launch the kernel into preallocated outputs.

    x: (B, T, C); weight: (C, K) or (C, 1, K); conv_state: (B, C, K-1);
    out_y: (B, T, C); out_state: (B, C, K-1); out_states: (B, T, C, K-1) or None (window variant).
    All tensors on the same device (CUDA, or CPU under TRITON_INTERPRET=1).  Returns nothing.
    """
    weight, B, T, C, K = _check(x, weight, conv_state)
    assert tuple(out_y.shape) == (B, T, C), (out_y.shape, (B, T, C))
    assert tuple(out_state.shape) == (B, C, K - 1), (out_state.shape, (B, C, K - 1))
    window = out_states is not None
    if window:
        assert tuple(out_states.shape) == (B, T, C, K - 1), (out_states.shape, (B, T, C, K - 1))
    if B == 0 or C == 0:
        return
    block_t = max(block_t, triton.next_power_of_2(K - 1))  # time block 0 must cover all state reads
    block_t = min(block_t, max(triton.next_power_of_2(max(T, 1)), triton.next_power_of_2(K - 1)))
    block_c = min(block_c, triton.next_power_of_2(C))
    ss = out_states if window else out_y  # dummy pointer when not used
    sq = tuple(out_states.stride()) if window else (0, 0, 0, 0)
    grid = (triton.cdiv(C, block_c), max(triton.cdiv(T, block_t), 1), B)
    causal_conv1d_kernel[grid](
        x, weight, conv_state, out_y, out_state, ss,
        T, C,
        *x.stride(), *weight.stride(), *conv_state.stride(), *out_y.stride(), *out_state.stride(), *sq,
        K=K, KP=triton.next_power_of_2(K - 1), BLOCK_T=block_t, BLOCK_C=block_c, WINDOW=window, num_warps=num_warps,
    )


def causal_conv1d(x, weight, conv_state, window: bool = False, **launch_kw):
    """Allocating wrapper: returns (y, new_state) and with ``window`` also states, all in x's dtype."""
    import torch

    weight, B, T, C, K = _check(x, weight, conv_state)
    y = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
    new_state = torch.empty((B, C, K - 1), dtype=x.dtype, device=x.device)
    states = torch.empty((B, T, C, K - 1), dtype=x.dtype, device=x.device) if window else None
    causal_conv1d_triton(x, weight, conv_state, y, new_state, states, **launch_kw)
    return (y, new_state, states) if window else (y, new_state)
