"""GPU check + benchmark of the dualbrain::MoEDispatch Triton kernels on Qwen3.6-35B-A3B shapes.

Run on a CUDA machine with dualbrain installed (``pip install -e .``; not collected by pytest)::

    python tests/benchmarks/gpu_moe.py
    python tests/benchmarks/gpu_moe.py --dtypes bf16 --hbm-gbps 4800 --config '{"dec2_block_h": 32}'

For every (dtype, path, N) it checks the kernel output against the NumPy reference
(``plugins/moe_dispatch/reference.py``, evaluated in float32 on the same -- already rounded -- inputs),
times ``moe_dispatch_triton`` (preallocated out + workspace, the plugin's call) with
``triton.testing.do_bench`` (L2 flushed between reps), and prints a markdown table.  Bytes moved =
the fc1 + fc2 weights of the experts actually hit (each once) + x, router logits and out; achieved
GB/s is that over the median time, "% roof" is relative to ``--hbm-gbps`` (H100 SXM: 3350).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import triton

from dualbrain.plugins.moe_dispatch import reference as ref
from dualbrain.plugins.moe_dispatch import triton as mt

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# max |err| allowed, relative to max |reference| (bf16 keeps 8 mantissa bits; prefill rounds the
# SwiGLU activations to the model dtype before the down projection, as vLLM does)
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def make_problem(N, H, I, E, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, H, generator=g, device=device).to(dtype)
    gate = (torch.randn(E, H, generator=g, device=device) * (2.0 / H ** 0.5)).to(dtype)
    logits = (x.float() @ gate.float().T).to(dtype)  # router logits in the model dtype, like the router
    return x, logits


def make_weights(H, I, E, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    fc1 = (torch.randn(E, 2 * I, H, generator=g, device=device) / H ** 0.5).to(dtype)
    fc2 = (torch.randn(E, H, I, generator=g, device=device) / I ** 0.5).to(dtype)
    return fc1, fc2


def reference(x, logits, fc1, fc2, top_k, normalize, hit):
    """NumPy reference in float32 (bf16 has no NumPy dtype) -- only the experts that are hit are
    converted, which keeps the 256-expert case at a few GB of host memory."""
    xf, lf = x.float().cpu().numpy(), logits.float().cpu().numpy()
    remap = np.full(fc1.shape[0], -1, np.int64)
    remap[hit] = np.arange(len(hit))
    sub_idx = torch.as_tensor(hit, device=fc1.device)
    fc1h = fc1.index_select(0, sub_idx).float().cpu().numpy()
    fc2h = fc2.index_select(0, sub_idx).float().cpu().numpy()
    # reference.moe_dispatch's body, with the weights restricted to the hit experts (routing uses all E)
    w, idx = ref.route(lf, top_k, normalize)
    if x.dtype == torch.float16:
        w = w.astype(np.float16).astype(np.float32)
    elif x.dtype == torch.bfloat16:
        w = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    y = np.zeros_like(xf)
    for e in np.unique(idx):
        tok, slot = np.nonzero(idx == e)
        h = xf[tok] @ fc1h[remap[e]].T
        gt, up = h[:, 0::2], h[:, 1::2]
        out = (gt / (1.0 + np.exp(-gt)) * up) @ fc2h[remap[e]].T
        np.add.at(y, tok, out * w[tok, slot][:, None])
    return y


def check_reference_shortcut():
    """The combine above must equal reference.moe_dispatch (guards against drift); small shapes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    lg = rng.standard_normal((5, 8)).astype(np.float32)
    fc1 = rng.standard_normal((8, 12, 16)).astype(np.float32)
    fc2 = rng.standard_normal((8, 16, 6)).astype(np.float32)
    want = ref.moe_dispatch(x, lg, fc1, fc2, 2, True)
    hit = np.unique(ref.route(lg, 2)[1])
    got = reference(*(torch.from_numpy(a) for a in (x, lg, fc1, fc2)), 2, True, hit)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--decode", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 4096])
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM roofline in GB/s (H100 SXM 3350)")
    ap.add_argument("--config", type=json.loads, default=None, help="JSON dict overriding triton.DEFAULT_CONFIG")
    ap.add_argument("--no-check", action="store_true", help="skip the NumPy reference check")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=200)
    ap.add_argument("--device", default="cuda", help="'cpu' = smoke test under TRITON_INTERPRET=1 (tiny shapes)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    check_reference_shortcut()

    if args.device == "cuda":
        def sync():
            torch.cuda.synchronize()

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep)
    else:
        def sync():
            pass

        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    H, I, E, K = args.hidden, args.inter, args.experts, args.top_k
    dev = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# MoEDispatch Triton kernels -- {dev}, triton {triton.__version__}, torch {torch.__version__}")
    print(f"H={H} I={I} E={E} top_k={K}; roofline {args.hbm_gbps:.0f} GB/s; config {args.config or 'default'}\n")
    print("| dtype | path | N | experts hit | MB moved | time (us) | GB/s | % roof | max abs err "
          "| err / max abs ref | ok |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    failures = 0
    for name in args.dtypes:
        dtype = DTYPES[name]
        fc1, fc2 = make_weights(H, I, E, dtype, seed=1, device=args.device)
        isz = fc1.element_size()
        per_expert = (2 * I * H + H * I) * isz
        runs = [("decode", n) for n in args.decode] + [("prefill", n) for n in args.prefill]
        for path, N in runs:
            x, logits = make_problem(N, H, I, E, dtype, seed=N, device=args.device)
            out = torch.empty_like(x)
            ws = torch.empty(mt.workspace_bytes(N, H, I, E, K, dtype, path=path), dtype=torch.uint8, device=args.device)

            def call():
                return mt.moe_dispatch_triton(x, logits, fc1, fc2, K, True, out, ws, path=path, config=args.config)

            call()
            sync()
            _, idx = mt.route(logits, K, True, config=args.config)
            hit = np.unique(idx.cpu().numpy())
            err = rel = float("nan")
            ok = "skipped"
            if not args.no_check:
                want = reference(x, logits, fc1, fc2, K, True, hit)
                got = out.float().cpu().numpy()
                err = float(np.abs(got - want).max())
                rel = err / max(float(np.abs(want).max()), 1e-30)
                good = np.isfinite(got).all() and rel <= TOL[dtype]
                ok = "yes" if good else "**NO**"
                failures += not good
            ms = bench(call)
            nbytes = len(hit) * per_expert + (2 * N * H + N * E) * isz
            gbps = nbytes / (ms * 1e-3) / 1e9
            print(f"| {name} | {path} | {N} | {len(hit)} | {nbytes / 1e6:.1f} | {ms * 1e3:.1f} | {gbps:.0f} | "
                  f"{100 * gbps / args.hbm_gbps:.1f} | {err:.3g} | {rel:.3g} | {ok} |", flush=True)
            del x, logits, out, ws
        del fc1, fc2
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if failures:
        print(f"\n{failures} run(s) outside tolerance {TOL}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
