"""GPU check + benchmark of the Triton kernels of CausalConv1d and GatedDeltaRule (not a pytest file).

Run on a CUDA machine (not under TRITON_INTERPRET):

    python tests/benchmarks/gpu_kernels.py [--hbm-gbps 3350] [--skip-check] [--reps 100] [--extra-modes]

Shapes are Qwen3.6-35B-A3B's Gated DeltaNet layers: Hk=16, Hv=32, dk=dv=128, conv channels
C = 2*16*128 + 32*128 = 8192, K=4; decode B in {1, 8} with T=1 and prefill B=1 with T in {512, 4096}.
Each kernel is first checked against the NumPy reference (float64 inside; the long prefill check
takes a few seconds of CPU), then timed with ``triton.testing.do_bench``.  Bytes moved = inputs read
+ outputs written + state read and written (the chunked path also counts its float32 W/U workspace,
written once and read once); achieved GB/s and the percentage of the HBM roofline given by
``--hbm-gbps`` (3350 = H100 SXM) are printed as a markdown table.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _err(got, want):
    got = got.detach().float().cpu().numpy().astype(np.float64)
    want = np.asarray(want, np.float64)
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def conv_cases(torch, dev, check: bool):
    from dualbrain.plugins.causal_conv import reference as cref
    from dualbrain.plugins.causal_conv import triton as ctri

    C, K = 2 * 16 * 128 + 32 * 128, 4
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for B, T, window in ((1, 1, False), (8, 1, False), (8, 1, True), (1, 512, False), (1, 4096, False)):
            g = torch.Generator(device="cpu").manual_seed(B * 7 + T)
            x = torch.randn(B, T, C, generator=g).to(dtype).to(dev)
            w = (torch.randn(C, K, generator=g) * 0.5).to(dtype).to(dev)
            s = torch.randn(B, C, K - 1, generator=g).to(dtype).to(dev)
            y = torch.empty_like(x)
            ns = torch.empty_like(s)
            ss = torch.empty(B, T, C, K - 1, dtype=dtype, device=dev) if window else None
            fn = lambda: ctri.causal_conv1d_triton(x, w, s, y, ns, ss)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            err = "-"
            if check:
                npd = np.float32 if dtype == torch.bfloat16 else {torch.float16: np.float16,
                                                                   torch.float32: np.float32}[dtype]
                ref = cref.causal_conv1d(x.float().cpu().numpy().astype(npd), w.float().cpu().numpy().astype(npd),
                                         s.float().cpu().numpy().astype(npd), window=window)
                e_y, m_y = _err(y, ref[0])
                e_s, _ = _err(ns, ref[1])
                e_w = _err(ss, ref[2])[0] if window else 0.0
                err = f"y {e_y:.1e} (|y|max {m_y:.1f}), state {max(e_s, e_w):.1e}"
            ms = _bench(fn)
            moved = _nbytes(x, w, s, y, ns) + (_nbytes(ss) if window else 0)
            name = f"conv{' window' if window else ''} {str(dtype).replace('torch.', '')}"
            rows.append((name, f"B={B} T={T} C={C} K={K}", "-", ms, moved, err))
    return rows


def gdn_cases(torch, dev, check: bool, extra_modes: bool):
    from dualbrain.plugins.gated_delta import reference as gref
    from dualbrain.plugins.gated_delta import triton as gtri

    Hk, Hv, dk, dv = 16, 32, 128, 128
    rows = []
    cases = [(1, 1, False, "auto"), (8, 1, False, "auto"), (8, 1, True, "auto"), (1, 16, False, "auto"),
             (1, 512, False, "auto"), (1, 4096, False, "auto")]
    if extra_modes:
        cases += [(1, 512, False, "recurrent"), (1, 4096, False, "recurrent"), (1, 64, False, "chunked")]
    for B, T, window, mode in cases:
        xs = gref.random_inputs(np.random.default_rng(B * 31 + T), B, T, Hk, Hv, dk, dv)
        tq, tk, tv, tg, tb, ts = (torch.from_numpy(a).to(dev) for a in xs)
        o = torch.empty(B, T, Hv, dv, device=dev)
        ns = torch.empty(B, Hv, dk, dv, device=dev)
        ss = torch.empty(B, T, Hv, dk, dv, device=dev) if window else None
        ws = torch.empty(max(gtri.chunk_workspace_numel(B, T, Hv, dk, dv), 1), device=dev)
        used = gtri.gated_delta_rule_triton(tq, tk, tv, tg, tb, ts, o, ns, ss, mode=mode, workspace=ws)
        torch.cuda.synchronize()
        fn = lambda: gtri.gated_delta_rule_triton(tq, tk, tv, tg, tb, ts, o, ns, ss,  # noqa: E731
                                                  mode=mode, workspace=ws)
        err = "-"
        if check:
            ref = gref.gated_delta_rule(*xs, window=window)
            e_o, m_o = _err(o, ref[0])
            e_s, m_s = _err(ns, ref[1])
            e_w = _err(ss, ref[2])[0] if window else 0.0
            err = f"o {e_o:.1e} (|o|max {m_o:.1f}), state {max(e_s, e_w):.1e} (|S|max {m_s:.1f})"
        ms = _bench(fn)
        moved = _nbytes(tq, tk, tv, tg, tb, ts, o, ns) + (_nbytes(ss) if window else 0)
        if used == "chunked":
            moved += 2 * B * T * Hv * (dk + dv) * 4  # W/U workspace written once, read once
        name = f"gdn{' window' if window else ''} fp32"
        rows.append((name, f"B={B} T={T} Hk={Hk} Hv={Hv} dk={dk} dv={dv}", used, ms, moved, err))
    return rows


def _bench(fn):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=_bench.rep))


_bench.rep = 100


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth roofline (H100 SXM: 3350)")
    ap.add_argument("--skip-check", action="store_true", help="do not compare with the NumPy reference")
    ap.add_argument("--reps", type=int, default=100, help="do_bench rep time in ms")
    ap.add_argument("--extra-modes", action="store_true",
                    help="also time the recurrent kernel on prefill and the chunked one on T=64")
    ap.add_argument("--only", choices=("conv", "gdn"), default=None)
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    _bench.rep = a.reps
    dev = torch.device("cuda")
    rows = []
    if a.only in (None, "conv"):
        rows += conv_cases(torch, dev, not a.skip_check)
    if a.only in (None, "gdn"):
        rows += gdn_cases(torch, dev, not a.skip_check, a.extra_modes)
    print(f"\n{torch.cuda.get_device_name()}  roofline {a.hbm_gbps:.0f} GB/s\n")
    print("| kernel | shape | path | time (us) | MB moved | GB/s | % HBM roofline | max abs err vs reference |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for name, shape, path, ms, moved, err in rows:
        gbps = moved / (ms * 1e-3) / 1e9
        print(f"| {name} | {shape} | {path} | {ms * 1e3:.1f} | {moved / 1e6:.2f} | {gbps:.0f} | "
              f"{100 * gbps / a.hbm_gbps:.1f} | {err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
