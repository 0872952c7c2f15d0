"""Decode with and without dualbrain's CPU kernels (runtime/backends/ort_kernels.py), same exports.

    python tests/benchmarks/cpu_kernels.py EXPORT [EXPORT ...] [--batch 1,8] [--steps 60] [--reps 3]

Each measurement is its own process (loading one model; ONNX Runtime's spinning threads of a second
model in the same process would take the cores), on and off alternating, `--reps` times each; the
table gives the median ms per decode step (random prompts of 64 tokens, one per row, greedy, after 5
warm-up steps) and whether the greedy tokens were the same with and without the kernels.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def _one(export: str, kernels: bool, batch: int, steps: int) -> dict:
    import time

    from dualbrain.bench import _prompts
    from dualbrain.runtime.generate import decode_one, prefill
    from dualbrain.runtime.model import Model

    model = Model.load(export, cpu_kernels=kernels)
    state, logits = prefill(model, _prompts(model.vocab_size, batch, 64), new_tokens=steps + 8)
    tok, times, ids = logits.argmax(-1), [], []
    for _ in range(steps + 5):
        t = time.perf_counter()
        logits = decode_one(model, state, tok)
        times.append(time.perf_counter() - t)
        tok = logits.argmax(-1)
        ids.append(tok.tolist())
    return {"ms": statistics.median(times[5:]) * 1e3, "ids": ids}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(_one(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print("| export | batch | kernels on: ms/step | off: ms/step | speedup | same tokens |")
    print("|---|---|---|---|---|---|")
    for export in args.exports:
        for batch in map(int, args.batch.split(",")):
            runs = {True: [], False: []}
            for _ in range(args.reps):
                for on in (True, False):
                    out = subprocess.run([sys.executable, __file__, "--one", export, str(int(on)), str(batch),
                                          str(args.steps)], capture_output=True, text=True, check=True).stdout
                    runs[on].append(json.loads(out.strip().splitlines()[-1]))
            on, off = (statistics.median(r["ms"] for r in runs[k]) for k in (True, False))
            same = all(a["ids"] == b["ids"] for a, b in zip(runs[True], runs[False]))
            print(f"| {export} | {batch} | {on:.1f} | {off:.1f} | {off / on:.2f}× | {same} |", flush=True)


if __name__ == "__main__":
    main()
