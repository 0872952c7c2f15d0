"""Triton kernels of ``dualbrain::GatedDeltaRule`` / ``dualbrain::GatedDeltaRuleWindow``.

Same semantics as :mod:`.reference`: per value head h (q/k head h // (Hv // Hk)), per position t,
with S of shape (dk, dv):  S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q.
Inputs may be float32/float16/bfloat16 (loaded and computed in float32); the state and all outputs
are float32 in the op (the kernels store into whatever dtype the output tensors have).

Kernels
-------
* ``gdn_recurrent_kernel`` -- decode / short T and the window variant.  Grid (cdiv(dv, BV), B*Hv):
  the columns of S are independent under the delta rule, so each program keeps a (dk, BV) state
  tile in registers and loops over T; with WINDOW it also stores the state after every position.
* ``gdn_chunk_prep_kernel`` + ``gdn_chunk_fwd_kernel`` -- chunked prefill (chunk 64, the WY/UT
  form of flash-linear-attention's ``chunk_gated_delta_rule`` / transformers'
  ``torch_chunk_gated_delta_rule``).  With G the within-chunk cumulative sum of g and
  L[i, j] = beta_i (k_i . k_j) exp(G_i - G_j) for i > j, the prep kernel (grid (chunks, B*Hv), fully
  parallel) forms M = (I + L)^-1 by forward substitution and writes
  W = M (beta k exp(G)) and U = M (beta v) to a float32 workspace.  The forward kernel (grid
  (cdiv(dv, BV), B*Hv), sequential over chunks) then does per chunk
      V' = U - W S
      O  = (q exp(G)) S + [(q k^T) * exp(G_i - G_j)]_{i >= j} V'
      S  = exp(G_last) S + (k exp(G_last - G))^T V'

Public API
----------
``gated_delta_rule_triton(q, k, v, g, beta, state, out_o, out_state, out_states=None, *,
mode="auto", workspace=None, ...)``
    Launch into preallocated outputs (e.g. TensorRT buffers wrapped as torch CUDA tensors).
    ``out_states`` given = window variant (always recurrent).  ``mode``: "auto" (recurrent for
    T <= RECURRENT_MAX_T, chunked otherwise), "recurrent" or "chunked".  The chunked path needs a
    float32 workspace of ``chunk_workspace_numel(B, T, Hv, dk, dv)`` elements (allocated with torch
    when ``workspace`` is None).  ``out_state`` may alias ``state`` (in-place update): each program
    reads its state tile before it writes it, and tiles are disjoint.
``gated_delta_rule(q, k, v, g, beta, state, window=False, out=None, **kw)``
    Dispatcher / allocating wrapper: returns (o, new_state[, states]); ``out`` is an optional
    tuple of preallocated outputs (o, new_state[, states]).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["CHUNK", "RECURRENT_MAX_T", "chunk_workspace_numel", "gated_delta_rule",
           "gated_delta_rule_triton", "gdn_chunk_fwd_kernel", "gdn_chunk_prep_kernel",
           "gdn_recurrent_kernel"]

CHUNK = 64
RECURRENT_MAX_T = 16

try:  # tl.sum == tl.reduce(x, axis, _sum_combine); calling reduce directly with this combine_fn
    # compiles identically and lets TRITON_INTERPRET=1 take its numpy fast path without the
    # per-call re-patching that every nested @jit call (tl.sum itself) costs in the interpreter.
    from triton.language.standard import _sum_combine as _add
except ImportError:  # pragma: no cover - other triton versions
    @triton.jit
    def _add(a, b):
        return a + b


# ----------------------------------------------------------------------------- recurrent
@triton.jit
def gdn_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s_ptr, o_ptr, ns_ptr, ss_ptr,
    T, HV, DK, DV, R,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sgb, sgt, sgh,
    sbb, sbt, sbh,
    ssb, ssh, ssk, ssv,
    sob, sot, soh, sod,
    snb, snh, snk, snv,
    swb, swt, swh, swk, swv,
    BK: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HV).to(tl.int64)
    h = pid_bh % HV
    hk = h // R
    rk = tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    m2 = mk[:, None] & mv[None, :]

    S = tl.load(s_ptr + b * ssb + h * ssh + rk[:, None] * ssk + rv[None, :] * ssv,
                mask=m2, other=0.0).to(tl.float32)
    q_cur = q_ptr + b * sqb + hk * sqh + rk * sqd
    k_cur = k_ptr + b * skb + hk * skh + rk * skd
    v_cur = v_ptr + b * svb + h * svh + rv * svd
    g_cur = g_ptr + b * sgb + h * sgh
    b_cur = b_ptr + b * sbb + h * sbh
    o_cur = o_ptr + b * sob + h * soh + rv * sod
    w_cur = ss_ptr + b * swb + h * swh + rk[:, None] * swk + rv[None, :] * swv
    for _ in range(T):  # pointers advance by one time step per iteration
        kt = tl.load(k_cur, mask=mk, other=0.0).to(tl.float32)
        qt = tl.load(q_cur, mask=mk, other=0.0).to(tl.float32)
        vt = tl.load(v_cur, mask=mv, other=0.0).to(tl.float32)
        gt = tl.load(g_cur).to(tl.float32)
        bt = tl.load(b_cur).to(tl.float32)
        S = S * tl.exp(gt)
        kv = tl.reduce(S * kt[:, None], 0, _add)
        delta = bt * (vt - kv)
        S = S + kt[:, None] * delta[None, :]
        ot = tl.reduce(S * qt[:, None], 0, _add)
        tl.store(o_cur, ot.to(o_ptr.dtype.element_ty), mask=mv)
        if WINDOW:
            tl.store(w_cur, S.to(ss_ptr.dtype.element_ty), mask=m2)
            w_cur += swt
        q_cur += sqt
        k_cur += skt
        v_cur += svt
        g_cur += sgt
        b_cur += sbt
        o_cur += sot
    tl.store(ns_ptr + b * snb + h * snh + rk[:, None] * snk + rv[None, :] * snv,
             S.to(ns_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- chunked
@triton.jit
def gdn_chunk_prep_kernel(
    k_ptr, v_ptr, g_ptr, b_ptr, w_ptr, u_ptr,
    T, HV, DK, DV, R,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sgb, sgt, sgh,
    sbb, sbt, sbh,
    BT: tl.constexpr, BK: tl.constexpr, BVP: tl.constexpr, PREC: tl.constexpr,
):
    """Per (chunk, b, h): W = M (beta k exp(G)) (BT, DK) and U = M (beta v) (BT, DV), M = (I + L)^-1.

    Workspace layout (float32, contiguous): W (B, HV, T, DK), U (B, HV, T, DV)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HV).to(tl.int64)
    h = pid_bh % HV
    hk = h // R
    t0 = pid_n * BT
    rt = t0 + tl.arange(0, BT)
    mt = rt < T
    rk = tl.arange(0, BK)
    mk = rk < DK
    rv = tl.arange(0, BVP)
    mv = rv < DV

    kc = tl.load(k_ptr + b * skb + hk * skh + rt[:, None] * skt + rk[None, :] * skd,
                 mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
    vc = tl.load(v_ptr + b * svb + h * svh + rt[:, None] * svt + rv[None, :] * svd,
                 mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
    gc = tl.load(g_ptr + b * sgb + h * sgh + rt * sgt, mask=mt, other=0.0).to(tl.float32)
    bc = tl.load(b_ptr + b * sbb + h * sbh + rt * sbt, mask=mt, other=0.0).to(tl.float32)
    G = tl.associative_scan(gc, 0, _add)

    ii = tl.arange(0, BT)
    lower = ii[:, None] > ii[None, :]
    kk = tl.dot(kc, tl.trans(kc), input_precision=PREC)
    dG = G[:, None] - G[None, :]
    # A = -L (strictly lower); forward substitution gives A <- (I + L)^-1 - I row by row
    A = tl.where(lower, -(bc[:, None] * kk) * tl.exp(tl.where(lower, dG, 0.0)), 0.0)
    for i in range(1, tl.minimum(T - t0, BT)):  # padded rows stay identity rows
        row = tl.reduce(tl.where(ii[:, None] == i, A, 0.0), 0, _add)  # (BT,), zero for cols >= i
        new = row + tl.reduce(row[:, None] * A, 0, _add)
        A = tl.where(ii[:, None] == i, new[None, :], A)
    M = A + tl.where(ii[:, None] == ii[None, :], 1.0, 0.0)

    kb = kc * (bc * tl.exp(G))[:, None]
    vb = vc * bc[:, None]
    W = tl.dot(M, kb, input_precision=PREC)
    U = tl.dot(M, vb, input_precision=PREC)
    tl.store(w_ptr + (b * HV + h) * T * DK + rt[:, None] * DK + rk[None, :], W,
             mask=mt[:, None] & mk[None, :])
    tl.store(u_ptr + (b * HV + h) * T * DV + rt[:, None] * DV + rv[None, :], U,
             mask=mt[:, None] & mv[None, :])


@triton.jit
def gdn_chunk_fwd_kernel(
    q_ptr, k_ptr, g_ptr, w_ptr, u_ptr, s_ptr, o_ptr, ns_ptr,
    T, HV, DK, DV, R,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    sgb, sgt, sgh,
    ssb, ssh, ssk, ssv,
    sob, sot, soh, sod,
    snb, snh, snk, snv,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HV).to(tl.int64)
    h = pid_bh % HV
    hk = h // R
    rk = tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    ii = tl.arange(0, BT)
    causal = ii[:, None] >= ii[None, :]

    S = tl.load(s_ptr + b * ssb + h * ssh + rk[:, None] * ssk + rv[None, :] * ssv,
                mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    wbase = w_ptr + (b * HV + h) * T * DK
    ubase = u_ptr + (b * HV + h) * T * DV
    for t0 in range(0, T, BT):
        rt = t0 + ii
        mt = rt < T
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        qc = tl.load(q_ptr + b * sqb + hk * sqh + rt[:, None] * sqt + rk[None, :] * sqd,
                     mask=mtk, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + b * skb + hk * skh + rt[:, None] * skt + rk[None, :] * skd,
                     mask=mtk, other=0.0).to(tl.float32)
        gc = tl.load(g_ptr + b * sgb + h * sgh + rt * sgt, mask=mt, other=0.0).to(tl.float32)
        Wc = tl.load(wbase + rt[:, None] * DK + rk[None, :], mask=mtk, other=0.0)
        Uc = tl.load(ubase + rt[:, None] * DV + rv[None, :], mask=mtv, other=0.0)
        G = tl.associative_scan(gc, 0, _add)
        g_last = tl.reduce(gc, 0, _add)  # padded rows have g = 0

        Vn = Uc - tl.dot(Wc, S, input_precision=PREC)  # (BT, BV)
        qk = tl.dot(qc, tl.trans(kc), input_precision=PREC)  # (BT, BT)
        dG = G[:, None] - G[None, :]
        P = tl.where(causal, qk * tl.exp(tl.where(causal, dG, 0.0)), 0.0)
        O = tl.dot(qc * tl.exp(G)[:, None], S, input_precision=PREC) \
            + tl.dot(P, Vn, input_precision=PREC)
        tl.store(o_ptr + b * sob + h * soh + rt[:, None] * sot + rv[None, :] * sod,
                 O.to(o_ptr.dtype.element_ty), mask=mtv)
        kd = kc * tl.exp(g_last - G)[:, None]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(kd), Vn, input_precision=PREC)
    tl.store(ns_ptr + b * snb + h * snh + rk[:, None] * snk + rv[None, :] * snv,
             S.to(ns_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])


# ----------------------------------------------------------------------------- host side
def _shapes(q, k, v, g, beta, state):
    B, T, Hk, dk = k.shape
    Hv, dv = int(v.shape[2]), int(v.shape[3])
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"q {tuple(q.shape)} != k {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (B, T) or Hv % Hk:
        raise ValueError(f"v {tuple(v.shape)} does not fit k {tuple(k.shape)}")
    if tuple(g.shape) != (B, T, Hv) or tuple(beta.shape) != (B, T, Hv):
        raise ValueError(f"g {tuple(g.shape)} / beta {tuple(beta.shape)} != {(B, T, Hv)}")
    if tuple(state.shape) != (B, Hv, dk, dv):
        raise ValueError(f"state {tuple(state.shape)} != {(B, Hv, dk, dv)}")
    return int(B), int(T), int(Hk), Hv, int(dk), dv


def chunk_workspace_numel(B: int, T: int, Hv: int, dk: int, dv: int) -> int:
    """float32 elements of scratch the chunked path needs (W and U); 0 when T <= RECURRENT_MAX_T."""
    return B * Hv * T * (dk + dv)


def _block_v(dv: int, block_v):
    return block_v or min(triton.next_power_of_2(dv), 32)


def gated_delta_rule_triton(q, k, v, g, beta, state, out_o, out_state, out_states=None, *,
                            mode: str = "auto", workspace=None, block_v: int | None = None,
                            num_warps: int | None = None, input_precision: str = "ieee"):
    """Launch into preallocated outputs: out_o (B, T, Hv, dv), out_state (B, Hv, dk, dv) and, for the
    window variant, out_states (B, T, Hv, dk, dv).  Returns the mode actually used.

    ``input_precision`` is passed to ``tl.dot`` in the chunked path ("ieee" = exact fp32; "tf32" is
    faster on Ampere+ but only ~1e-3 accurate)."""
    B, T, Hk, Hv, dk, dv = _shapes(q, k, v, g, beta, state)
    assert tuple(out_o.shape) == (B, T, Hv, dv), (out_o.shape, (B, T, Hv, dv))
    assert tuple(out_state.shape) == (B, Hv, dk, dv), (out_state.shape, (B, Hv, dk, dv))
    window = out_states is not None
    if window:
        assert tuple(out_states.shape) == (B, T, Hv, dk, dv), (out_states.shape, (B, T, Hv, dk, dv))
    if mode not in ("auto", "recurrent", "chunked"):
        raise ValueError(f"mode {mode!r}")
    if mode == "auto":
        mode = "recurrent" if (window or T <= RECURRENT_MAX_T) else "chunked"
    if window and mode != "recurrent":
        raise ValueError("the window variant (per-position states) is recurrent only")
    if B == 0 or Hv == 0:
        return mode
    R = Hv // Hk
    BK = max(triton.next_power_of_2(dk), 16)
    if mode == "chunked" and T > 0:
        import torch

        BV = block_v or min(max(triton.next_power_of_2(dv), 16), 64)
        n = chunk_workspace_numel(B, T, Hv, dk, dv)
        if workspace is None:
            workspace = torch.empty(n, dtype=torch.float32, device=v.device)
        assert workspace.dtype == torch.float32 and workspace.numel() >= n and workspace.is_contiguous()
        ws_w = workspace[: B * Hv * T * dk]
        ws_u = workspace[B * Hv * T * dk: n]
        BVP = max(triton.next_power_of_2(dv), 16)
        gdn_chunk_prep_kernel[(triton.cdiv(T, CHUNK), B * Hv)](
            k, v, g, beta, ws_w, ws_u,
            T, Hv, dk, dv, R,
            *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
            BT=CHUNK, BK=BK, BVP=BVP, PREC=input_precision,
            num_warps=num_warps or (8 if max(BK, BVP) >= 128 else 4),
        )
        gdn_chunk_fwd_kernel[(triton.cdiv(dv, BV), B * Hv)](
            q, k, g, ws_w, ws_u, state, out_o, out_state,
            T, Hv, dk, dv, R,
            *q.stride(), *k.stride(), *g.stride(), *state.stride(), *out_o.stride(), *out_state.stride(),
            BT=CHUNK, BK=BK, BV=BV, PREC=input_precision, num_warps=num_warps or 8,
        )
        return mode
    BV = _block_v(dv, block_v)
    ss = out_states if window else out_state  # dummy pointer when not used
    sw = tuple(out_states.stride()) if window else (0, 0, 0, 0, 0)
    gdn_recurrent_kernel[(triton.cdiv(dv, BV), B * Hv)](
        q, k, v, g, beta, state, out_o, out_state, ss,
        T, Hv, dk, dv, R,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *state.stride(),
        *out_o.stride(), *out_state.stride(), *sw,
        BK=BK, BV=BV, WINDOW=window, num_warps=num_warps or 4,
    )
    return mode


def gated_delta_rule(q, k, v, g, beta, state, window: bool = False, out=None, **launch_kw):
    """Dispatcher: recurrent for T <= RECURRENT_MAX_T or ``window``, chunked otherwise (override with
    ``mode=``).  ``out``: optional preallocated (o, new_state[, states]).  Returns the same tuple."""
    import torch

    B, T, Hk, Hv, dk, dv = _shapes(q, k, v, g, beta, state)
    if out is None:
        f32, dev = torch.float32, v.device
        out = (torch.empty((B, T, Hv, dv), dtype=f32, device=dev),
               torch.empty((B, Hv, dk, dv), dtype=f32, device=dev))
        if window:
            out = out + (torch.empty((B, T, Hv, dk, dv), dtype=f32, device=dev),)
    out = tuple(out)
    if len(out) != (3 if window else 2):
        raise ValueError(f"out must hold {3 if window else 2} tensors, got {len(out)}")
    gated_delta_rule_triton(q, k, v, g, beta, state, *out, **launch_kw)
    return out
