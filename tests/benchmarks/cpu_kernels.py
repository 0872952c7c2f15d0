"""Decode with and without dualbrain's CPU kernels (runtime/backends/ort_kernels.py), or one of them, or
the load-time norm fusion (runtime/backends/ort_fusions.py), same exports.

    python tests/benchmarks/cpu_kernels.py EXPORT [EXPORT ...] [--batch 1,8] [--steps 60] [--reps 3]
        [--without kernels | rms_norm | shared_expert | gated_delta_mixer | OP_TYPE | ablate:OP_TYPE | lib:PATH]
        [--feed greedy | random] [--prompt 64]

`--without`: what the "without" side leaves out: every kernel (default), the norm fusion, the shared
expert's place in the MoE kernels (`ort_kernels._shared_expert`: it then runs as its own nodes), the GDN
mixer's fusion into one kernel (`ort_kernels._gated_delta_mixer`: conv, norms, rule and gated norm then
run apart), the one kernel rewrite of an op type (e.g. GatedDeltaRule: its two forms; Attention: the
attention kernel, the split form then runs), or (`ablate:QMoE`) the work of every main-graph node of an
op type, each replaced by an Identity of its first input: the outputs are then wrong, but the time saved
is what those nodes cost in place, which ONNX Runtime's profiler overstates for short nodes; or
(`lib:PATH`) the kernels built from other sources, e.g. an older checkout's library from the cache
(`~/.cache/dualbrain/libdualbrain_cpu-*.so`). Each measurement is its own process (loading one model; ONNX
Runtime's spinning threads of a second model in the same process would take the cores), with and without
alternating, `--reps` times each; the table gives the median ms per decode step (random prompts of
`--prompt` tokens, 64 by default, one per row, after 5 warm-up steps) and whether the greedy tokens were
the same with and without. `--feed random` feeds seeded random tokens instead of the greedy ones, as
llama-bench does (greedy decoding measured 3-6 % faster on the mid-size MoE's random weights;
tests/benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from onnx import helper


def _leave_out(what: str) -> dict:
    """Model.load options, after turning off `what` in this process (`--without`)."""
    from dualbrain.runtime.backends import ort_fusions, ort_kernels

    if what.startswith("ablate:"):
        op, rewrite = what.split(":", 1)[1], ort_kernels.use_cpu_kernels

        def ablated(model, model_dir=".", supplied=None):
            n = rewrite(model, model_dir, supplied)
            for node in model.graph.node:
                if node.op_type == op:
                    node.CopyFrom(helper.make_node("Identity", node.input[:1], node.output[:1], name=node.name))
            return n
        ort_kernels.use_cpu_kernels = ablated
        return {}
    if what.startswith("lib:"):
        from pathlib import Path

        lib = Path(what.split(":", 1)[1])
        if not lib.is_file():
            raise SystemExit(f"--without {what}: no such library")
        ort_kernels.library = lambda: lib
        return {}
    if what == "kernels":
        return {"cpu_kernels": False}
    if what == "rms_norm":
        ort_fusions.fuse_rms_norm = lambda model: 0
        return {}
    if what == "shared_expert":
        ort_kernels._shared_expert = lambda moe, r: None
        return {}
    if what == "gated_delta_mixer":
        ort_kernels._gated_delta_mixer = lambda rule, r: None
        return {}
    keys = [k for k in ort_kernels.REWRITES if k[1].startswith(what)]
    if not keys:
        ops = sorted(k[1] for k in ort_kernels.REWRITES)
        raise SystemExit(f"--without {what}: not 'kernels', 'rms_norm' or one of the kernels' op types {ops}")
    for k in keys:
        del ort_kernels.REWRITES[k]
    return {}


def _one(export: str, without: str | None, batch: int, steps: int, feed: str, prompt: int) -> dict:
    import time

    import numpy as np

    from dualbrain.bench import _prompts
    from dualbrain.runtime.generate import decode_one, prefill
    from dualbrain.runtime.model import Model

    model = Model.load(export, **(_leave_out(without) if without else {}))
    state, logits = prefill(model, _prompts(model.vocab_size, batch, prompt), new_tokens=steps + 8)
    tok, times, ids, rng = logits.argmax(-1), [], [], np.random.default_rng(0)
    for _ in range(steps + 5):
        t = time.perf_counter()
        logits = decode_one(model, state, tok)
        times.append(time.perf_counter() - t)
        greedy = logits.argmax(-1)
        ids.append(greedy.tolist())
        tok = greedy if feed == "greedy" else rng.integers(0, model.vocab_size, batch)
    return {"ms": statistics.median(times[5:]) * 1e3, "ids": ids}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(_one(sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
                              int(sys.argv[7]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens a row (the context decode starts from)")
    ap.add_argument("--without", default="kernels",
                    help="kernels (all), rms_norm, shared_expert, gated_delta_mixer, one kernel's op type, "
                         "ablate:OP_TYPE (its nodes' work) or lib:PATH (the kernels from another build)")
    ap.add_argument("--feed", choices=("greedy", "random"), default="greedy",
                    help="tokens fed back: the greedy ones, or seeded random ones (as llama-bench feeds)")
    args = ap.parse_args()
    print(f"| export | batch | with: ms/step | without {args.without}: ms/step | speedup | same tokens |")
    print("|---|---|---|---|---|---|")
    for export in args.exports:
        for batch in map(int, args.batch.split(",")):
            runs = {True: [], False: []}
            for _ in range(args.reps):
                for on in (True, False):
                    cmd = [sys.executable, __file__, "--one", export, "" if on else args.without, str(batch),
                           str(args.steps), args.feed, str(args.prompt)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    runs[on].append(json.loads(out.strip().splitlines()[-1]))
            on, off = (statistics.median(r["ms"] for r in runs[k]) for k in (True, False))
            same = all(a["ids"] == b["ids"] for a, b in zip(runs[True], runs[False]))
            print(f"| {export} | {batch} | {on:.1f} | {off:.1f} | {off / on:.2f}× | {same} |", flush=True)


if __name__ == "__main__":
    main()
