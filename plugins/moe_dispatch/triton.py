"""Triton kernels for ``dualbrain::MoEDispatch`` (the TensorRT plugin's ``enqueue`` launches these).

Semantics are those of :func:`dualbrain.plugins.moe_dispatch.reference.moe_dispatch`: softmax over
all E experts in float32, top-k (ties towards the lower expert index), optional renormalisation,
routing weights rounded to ``x.dtype``, ``y = sum_k w_k * fc2[e_k] @ (silu(gate) * up)`` with
``fc1[e]`` gate/up rows interleaved (row 2i gate i, row 2i+1 up i).  All accumulation is float32;
x / fc1 / fc2 / out share one dtype (float32, float16 or bfloat16); router logits may be any float.

Kernels
-------
* ``_route_kernel``         one program per BLOCK_T tokens: fp32 softmax, k arg-max passes (lowest
                            index among equal probabilities), renormalisation -> w fp32, idx int32.
* decode path (few tokens, weight-bandwidth bound GEMV):
  ``_decode_fc1_kernel``    grid (N*k, cdiv(I, BLOCK_I)): gated up-projection + SwiGLU of one
                            (token, chosen expert) pair into the fp32 workspace ``act[N*k, I]``;
  ``_decode_fc2_kernel``    grid (N, cdiv(H, BLOCK_H)): down projection, weighted and summed over
                            the k slots in order 0..k-1 inside the program -> ``out`` (no atomics).
* prefill path (grouped GEMM):
  expert grouping with torch ops on device (stable sort / searchsorted / cumsum; no host
  synchronisation) -> a tile schedule of ``cdiv(N*k, BLOCK_M) + min(E, N*k)`` M-tiles (an upper
  bound, so the grid needs no sync; unused tiles exit at once), each tile = up to BLOCK_M
  (token, slot) rows of one expert;
  ``_grouped_fc1_kernel``   grid (tiles, cdiv(I, BLOCK_N)): x rows gathered, ``tl.dot`` against
                            the expert's gate and up rows, SwiGLU -> ``act`` (rows in sorted order);
  ``_grouped_fc2_kernel``   grid (tiles, cdiv(H, BLOCK_N)): act @ fc2[e]^T, times the routing
                            weight, scattered to ``partial[token*k + slot, H]`` (fp32);
  ``_combine_kernel``       grid (N, cdiv(H, BLOCK_H)): ``out[t] = sum_{s<k} partial[t*k+s]`` in
                            fixed order (deterministic, no atomics).

Public API
----------
* :func:`workspace_bytes` ``(N, H, I, E, top_k, dtype, path="auto")`` -- scratch bytes needed.
* :func:`moe_dispatch_triton` ``(x, router_logits, fc1, fc2, top_k, normalize, out, workspace=None,
  path="auto", config=None)`` -- writes ``out`` (preallocated ``[N, H]``), returns it.
* :func:`moe_dispatch` ``(x, router_logits, fc1, fc2, top_k, normalize=True, path="auto")`` --
  allocating convenience wrapper.
* :func:`route` ``(router_logits, top_k, normalize=True)`` -- the routing kernel alone
  (weights fp32 [N, k], indices int32 [N, k]).

``path="auto"`` picks decode for ``N <= DECODE_MAX_TOKENS`` (8) and prefill otherwise.  The prefill
launcher runs a few torch ops on the current torch stream (the plugin must make the TensorRT stream
current, e.g. ``with torch.cuda.stream(torch.cuda.ExternalStream(stream))``); they allocate
O(N*k) int64 temporaries from torch's caching allocator, everything else lives in ``workspace``
(256-byte aligned segments: w fp32 [N*k], idx int32 [N*k], act [N*k, I] -- fp32 for decode, the
model dtype for fp16/bf16 prefill, whose tensor-core GEMM consumes it -- and, prefill only, the
fp32 per-slot outputs [N*k, H]).  Block sizes / warps: :data:`DEFAULT_CONFIG` (H100-oriented,
untuned), overridable per call with ``config``.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

__all__ = ["DECODE_MAX_TOKENS", "DEFAULT_CONFIG", "workspace_bytes", "moe_dispatch_triton", "moe_dispatch",
           "route"]

DECODE_MAX_TOKENS = 8
_ALIGN = 256

DEFAULT_CONFIG = {
    # routing
    "route_block_t": 8, "route_warps": 4,
    # decode GEMV
    "dec1_block_i": 16, "dec1_block_h": 256, "dec1_warps": 8,
    "dec2_block_h": 16, "dec2_block_i": 256, "dec2_warps": 8,
    # prefill grouped GEMM
    "block_m": 64,
    "pre1_block_n": 64, "pre1_block_k": 64, "pre1_warps": 8, "pre1_stages": 3,
    "pre2_block_n": 128, "pre2_block_k": 64, "pre2_warps": 8, "pre2_stages": 3,
    "comb_block_h": 256, "comb_warps": 4,
}


# ============================================================================ kernels
@triton.jit
def _route_kernel(logits_ptr, w_ptr, idx_ptr, N, E,
                  K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                  NORMALIZE: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < N
    offs_t = offs_t.to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    m = mt[:, None] & (offs < E)[None, :]
    lg = tl.load(logits_ptr + offs_t[:, None] * E + offs[None, :], mask=m, other=-float("inf")).to(tl.float32)
    lg = tl.where(mt[:, None], lg, 0.0)  # padding tokens: finite rows, results discarded
    me = (offs < E)[None, :]
    ex = tl.exp(lg - tl.max(lg, axis=1)[:, None])
    ex = tl.where(me, ex, 0.0)
    p = ex / tl.sum(ex, axis=1)[:, None]
    p = tl.where(me, p, -1.0)  # padding lanes are never chosen (probabilities are >= 0)
    ks = tl.arange(0, BLOCK_K)
    wv = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    iv = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in tl.static_range(K):
        best = tl.max(p, axis=1)[:, None]
        arg = tl.min(tl.where(p == best, offs[None, :], BLOCK_E), axis=1)[:, None]  # lowest index among ties
        wv = tl.where(ks[None, :] == j, best, wv)
        iv = tl.where(ks[None, :] == j, arg, iv)
        p = tl.where(offs[None, :] == arg, -1.0, p)
    if NORMALIZE:
        wv = wv / tl.sum(wv, axis=1)[:, None]  # padding lanes hold 0
    om = mt[:, None] & (ks < K)[None, :]
    tl.store(w_ptr + offs_t[:, None] * K + ks[None, :], wv, mask=om)
    tl.store(idx_ptr + offs_t[:, None] * K + ks[None, :], iv, mask=om)


@triton.jit
def _decode_fc1_kernel(x_ptr, fc1_ptr, idx_ptr, act_ptr, H, I,
                       K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    ts = tl.program_id(0).to(tl.int64)  # token * K + slot
    pid_i = tl.program_id(1)
    t = ts // K
    e = tl.load(idx_ptr + ts).to(tl.int64)
    # the 2*BLOCK_I interleaved rows (gate_i, up_i, gate_i+1, ...) form one contiguous [2BI, H] block
    offs_r = 2 * pid_i * BLOCK_I + tl.arange(0, 2 * BLOCK_I)
    mr = offs_r < 2 * I
    rows = fc1_ptr + e * (2 * I) * H + offs_r.to(tl.int64)[:, None] * H  # [2BI, 1]
    acc = tl.zeros([2 * BLOCK_I, BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        xv = tl.load(x_ptr + t * H + offs_h, mask=mh, other=0.0).to(tl.float32)
        wt = tl.load(rows + offs_h[None, :], mask=mr[:, None] & mh[None, :], other=0.0).to(tl.float32)
        acc += wt * xv[None, :]
    g, u = tl.split(tl.reshape(tl.sum(acc, axis=1), [BLOCK_I, 2]))
    a = g / (1.0 + tl.exp(-g)) * u
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(act_ptr + ts * I + offs_i, a, mask=offs_i < I)


@triton.jit
def _decode_fc2_kernel(act_ptr, fc2_ptr, idx_ptr, w_ptr, out_ptr, H, I,
                       K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = offs_h < H
    acc = tl.zeros([BLOCK_H, BLOCK_I], tl.float32)
    for s in range(K):  # fixed order -> deterministic
        ts = t * K + s
        e = tl.load(idx_ptr + ts).to(tl.int64)
        w = tl.load(w_ptr + ts).to(out_ptr.dtype.element_ty).to(tl.float32)  # router weight in model dtype
        rows = fc2_ptr + e * H * I + offs_h.to(tl.int64)[:, None] * I  # [BH, 1]
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mi = offs_i < I
            a = tl.load(act_ptr + ts * I + offs_i, mask=mi, other=0.0) * w
            wt = tl.load(rows + offs_i[None, :], mask=mh[:, None] & mi[None, :], other=0.0).to(tl.float32)
            acc += wt * a[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(out_ptr + t * H + offs_h, y.to(out_ptr.dtype.element_ty), mask=mh)


@triton.jit
def _grouped_fc1_kernel(x_ptr, fc1_ptr, sched_ptr, sorted_ptr, act_ptr, H, I, max_tiles,
                        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_IEEE: tl.constexpr):
    tile = tl.program_id(0)
    r0 = tl.load(sched_ptr + max_tiles + tile)
    r1 = tl.load(sched_ptr + 2 * max_tiles + tile)
    if r0 >= r1:
        return
    e = tl.load(sched_ptr + tile).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_M)
    mr = rows < r1
    ts = tl.load(sorted_ptr + rows, mask=mr, other=0)  # rows past the group read token 0 (never stored)
    tok = ts // K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok.to(tl.int64)[:, None] * H + offs_k[None, :]  # [BM, BK]
    g_ptrs = fc1_ptr + e * (2 * I) * H + (2 * offs_n)[None, :] * H + offs_k[:, None]  # gate rows [BK, BN]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mk = offs_k < H - k0
        a = tl.load(a_ptrs, mask=mk[None, :], other=0.0)
        bm = mk[:, None] & mn[None, :]
        bg = tl.load(g_ptrs, mask=bm, other=0.0)
        bu = tl.load(g_ptrs + H, mask=bm, other=0.0)  # up row 2i+1 follows gate row 2i
        if DOT_IEEE:
            acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=mr[:, None] & mn[None, :])


@triton.jit
def _grouped_fc2_kernel(act_ptr, fc2_ptr, sched_ptr, sorted_ptr, w_ptr, partial_ptr, H, I, max_tiles,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_IEEE: tl.constexpr):
    tile = tl.program_id(0)
    r0 = tl.load(sched_ptr + max_tiles + tile)
    r1 = tl.load(sched_ptr + 2 * max_tiles + tile)
    if r0 >= r1:
        return
    e = tl.load(sched_ptr + tile).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_M)
    mr = rows < r1
    rows = tl.where(mr, rows, r0)  # rows past the group re-read the first row (never stored)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows.to(tl.int64)[:, None] * I + offs_k[None, :]  # [BM, BK]
    b_ptrs = fc2_ptr + e * H * I + offs_n[None, :] * I + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        mk = offs_k < I - k0
        b = tl.load(b_ptrs, mask=mk[:, None] & mn[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mk[None, :], other=0.0).to(b.dtype)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    ts = tl.load(sorted_ptr + rows)
    w = tl.load(w_ptr + ts).to(fc2_ptr.dtype.element_ty).to(tl.float32)  # router weight in model dtype
    acc = acc * w[:, None]
    tl.store(partial_ptr + ts.to(tl.int64)[:, None] * H + offs_n[None, :], acc, mask=mr[:, None] & mn[None, :])


@triton.jit
def _combine_kernel(partial_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = offs_h < H
    y = tl.zeros([BLOCK_H], tl.float32)
    for s in range(K):
        y += tl.load(partial_ptr + (t * K + s) * H + offs_h, mask=mh, other=0.0)
    tl.store(out_ptr + t * H + offs_h, y.to(out_ptr.dtype.element_ty), mask=mh)


# ============================================================================ launchers
def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _pick_path(N: int, path: str) -> str:
    if path == "auto":
        return "decode" if N <= DECODE_MAX_TOKENS else "prefill"
    if path not in ("decode", "prefill"):
        raise ValueError(f"path must be 'auto', 'decode' or 'prefill', got {path!r}")
    return path


def _itemsize(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    import numpy as np
    return np.dtype(dtype).itemsize


def _layout(N, H, I, top_k, dtype, path):
    """[(name, torch dtype, numel)] of the workspace segments, each starting 256-byte aligned."""
    nk = N * top_k
    segs = [("w", torch.float32, nk), ("idx", torch.int32, nk)]
    if path == "decode":
        segs.append(("act", torch.float32, nk * I))
    else:
        act_dtype = torch.float32 if _itemsize(dtype) >= 4 else dtype
        segs += [("act", act_dtype, nk * I), ("partial", torch.float32, nk * H)]
    return segs


def _seg_bytes(segs):
    total = 0
    for _, dt, n in segs:
        total += -(-(n * _itemsize(dt)) // _ALIGN) * _ALIGN
    return total


def workspace_bytes(N: int, H: int, I: int, E: int, top_k: int, dtype=torch.float16, path: str = "auto") -> int:
    """Scratch bytes :func:`moe_dispatch_triton` needs for ``N`` tokens (``dtype``: x/weight dtype).

    Monotone in N, so the plugin can size the workspace from the largest N it will see.  ``E`` is
    accepted for the plugin's convenience (the expert grouping temporaries come from torch)."""
    del E
    return _seg_bytes(_layout(int(N), int(H), int(I), int(top_k), dtype, _pick_path(int(N), path)))


def _carve(workspace: torch.Tensor, segs):
    buf = workspace.view(-1).view(torch.uint8) if workspace.dtype != torch.uint8 else workspace.view(-1)
    out, off = {}, 0
    for name, dt, n in segs:
        nb = n * _itemsize(dt)
        out[name] = buf[off:off + nb].view(dt)
        off += -(-nb // _ALIGN) * _ALIGN
    return out


def _route_into(router_logits, top_k, normalize, w, idx, cfg):
    N, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
    bt = min(cfg["route_block_t"], _np2(N))
    _route_kernel[(triton.cdiv(N, bt),)](router_logits, w, idx, N, E, K=top_k, BLOCK_K=_np2(top_k), BLOCK_E=_np2(E),
                                         BLOCK_T=bt, NORMALIZE=bool(normalize), num_warps=cfg["route_warps"])


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = True, config: dict | None = None):
    """Routing kernel alone: (weights fp32 [N, k], expert indices int32 [N, k]), as reference.route."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    router_logits = router_logits.contiguous()
    N = router_logits.shape[0]
    w = torch.empty((N, top_k), dtype=torch.float32, device=router_logits.device)
    idx = torch.empty((N, top_k), dtype=torch.int32, device=router_logits.device)
    if N:
        _route_into(router_logits, int(top_k), normalize, w, idx, cfg)
    return w, idx


def _prefill_schedule(idx_flat: torch.Tensor, E: int, block_m: int):
    """Group (token, slot) rows by expert on device (no host sync).

    Returns (sched int32 [3, max_tiles] = expert, row start, row end per M-tile; sorted int32 [N*k]
    = flat (token*k + slot) ids ordered by expert, stable; max_tiles)."""
    nk = idx_flat.numel()
    dev = idx_flat.device
    # (torch.bincount would synchronise with the host on CUDA; sort + searchsorted does not)
    sorted_e, order = torch.sort(idx_flat, stable=True)
    sorted_ts = order.to(torch.int32)
    experts = torch.arange(E, device=dev, dtype=sorted_e.dtype)
    starts = torch.searchsorted(sorted_e, experts)
    ends = torch.searchsorted(sorted_e, experts, right=True)
    counts = ends - starts
    ntiles = (counts + (block_m - 1)) // block_m
    tile_ends = torch.cumsum(ntiles, 0)
    max_tiles = triton.cdiv(nk, block_m) + min(E, nk)
    tid = torch.arange(max_tiles, device=dev, dtype=tile_ends.dtype)
    te = torch.searchsorted(tile_ends, tid, right=True)
    valid = te < E
    te = te.clamp_max(E - 1)
    r0 = starts[te] + (tid - (tile_ends[te] - ntiles[te])) * block_m
    r1 = ends[te]
    zero = torch.zeros((), dtype=r0.dtype, device=dev)
    sched = torch.stack([te, torch.where(valid, r0, zero), torch.where(valid, r1, zero)]).to(torch.int32)
    return sched.contiguous(), sorted_ts, max_tiles


def moe_dispatch_triton(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                        top_k: int, normalize: bool, out: torch.Tensor, workspace: torch.Tensor | None = None,
                        path: str = "auto", config: dict | None = None) -> torch.Tensor:
    """Write the routed-expert output of ``x`` into ``out`` ([N, H], x's dtype) and return it.

    x [N, H]; router_logits [N, E]; fc1 [E, 2I, H] gate/up interleaved; fc2 [E, H, I]; all
    contiguous on one device.  ``workspace``: a contiguous tensor of at least
    ``workspace_bytes(N, H, I, E, top_k, x.dtype, path)`` bytes (allocated when None)."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    top_k = int(top_k)
    N, H = x.shape
    E, two_i, H1 = fc1.shape
    I = two_i // 2
    if two_i % 2 or H1 != H or tuple(fc2.shape) != (E, H, I) or tuple(router_logits.shape) != (N, E):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, router_logits {tuple(router_logits.shape)}, "
                         f"fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}")
    if not (x.dtype == fc1.dtype == fc2.dtype == out.dtype):
        raise TypeError(f"x/fc1/fc2/out dtypes differ: {x.dtype} {fc1.dtype} {fc2.dtype} {out.dtype}")
    if tuple(out.shape) != (N, H):
        raise ValueError(f"out must be {(N, H)}, got {tuple(out.shape)}")
    for name, t in (("x", x), ("router_logits", router_logits), ("fc1", fc1), ("fc2", fc2), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
    if N == 0:
        return out
    path = _pick_path(N, path)
    segs = _layout(N, H, I, top_k, x.dtype, path)
    need = _seg_bytes(segs)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8, device=x.device)
    elif workspace.numel() * workspace.element_size() < need:
        raise ValueError(f"workspace too small: {workspace.numel() * workspace.element_size()} < {need} bytes")
    ws = _carve(workspace, segs)
    w, idx, act = ws["w"], ws["idx"], ws["act"]
    _route_into(router_logits, top_k, normalize, w, idx, cfg)

    if path == "decode":
        bi = min(cfg["dec1_block_i"], _np2(I))
        bh = min(cfg["dec1_block_h"], _np2(H))
        _decode_fc1_kernel[(N * top_k, triton.cdiv(I, bi))](x, fc1, idx, act, H, I, K=top_k, BLOCK_I=bi, BLOCK_H=bh,
                                                             num_warps=cfg["dec1_warps"])
        bh = min(cfg["dec2_block_h"], _np2(H))
        bi = min(cfg["dec2_block_i"], _np2(I))
        _decode_fc2_kernel[(N, triton.cdiv(H, bh))](act, fc2, idx, w, out, H, I, K=top_k, BLOCK_H=bh, BLOCK_I=bi,
                                                     num_warps=cfg["dec2_warps"])
        return out

    ieee = x.dtype == torch.float32
    bm = cfg["block_m"]
    sched, sorted_ts, max_tiles = _prefill_schedule(idx.view(-1), E, bm)
    bn = max(16, min(cfg["pre1_block_n"], _np2(I)))
    bk = max(16, min(cfg["pre1_block_k"], _np2(H)))
    _grouped_fc1_kernel[(max_tiles, triton.cdiv(I, bn))](
        x, fc1, sched, sorted_ts, act, H, I, max_tiles, K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_IEEE=ieee, num_warps=cfg["pre1_warps"], num_stages=cfg["pre1_stages"])
    bn = max(16, min(cfg["pre2_block_n"], _np2(H)))
    bk = max(16, min(cfg["pre2_block_k"], _np2(I)))
    partial = ws["partial"]
    _grouped_fc2_kernel[(max_tiles, triton.cdiv(H, bn))](
        act, fc2, sched, sorted_ts, w, partial, H, I, max_tiles, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_IEEE=ieee, num_warps=cfg["pre2_warps"], num_stages=cfg["pre2_stages"])
    bh = min(cfg["comb_block_h"], _np2(H))
    _combine_kernel[(N, triton.cdiv(H, bh))](partial, out, H, K=top_k, BLOCK_H=bh, num_warps=cfg["comb_warps"])
    return out


def moe_dispatch(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                 top_k: int, normalize: bool = True, path: str = "auto", config: dict | None = None) -> torch.Tensor:
    """Allocating wrapper: decode path for N <= DECODE_MAX_TOKENS tokens, grouped-GEMM prefill otherwise."""
    x, router_logits, fc1, fc2 = (t.contiguous() for t in (x, router_logits, fc1, fc2))
    out = torch.empty_like(x)
    return moe_dispatch_triton(x, router_logits, fc1, fc2, top_k, normalize, out, path=path, config=config)
