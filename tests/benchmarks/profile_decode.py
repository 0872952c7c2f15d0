"""Where a decode step's time goes: ONNX Runtime's own profiler, per node kind, per token.

    python tests/benchmarks/profile_decode.py EXPORT [--batch 1,8] [--tokens 32] [--prompt 64] [--blocks]

Runs greedy decode steps on the export's linked graph (or its per-block sessions with `--blocks`)
with profiling on, after a prompt and a few unprofiled warm-up steps, and prints the time per token by
node kind (op type, with the custom ops' domains), the share of each, and the time spent outside
ONNX Runtime's nodes (the runtime's Python, feeds and fetches). For issue 16's profile-first rule.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def profile(export: str, batch: int, tokens: int, prompt: int, linked: bool) -> dict:
    from dualbrain.runtime.model import Model

    prefix = str(Path(tempfile.mkdtemp()) / f"b{batch}")
    model = Model.load(export, profile=prefix, linked=linked)
    rng = np.random.default_rng(0)
    state = model.new_state(batch, capacity=prompt + tokens + 8)
    logits = model.forward(rng.integers(0, min(model.vocab_size, 1000), (batch, prompt)), state)
    t_decode = time.perf_counter()
    for _ in range(tokens):
        logits = model.forward(logits.argmax(-1)[:, None], state)
    wall = time.perf_counter() - t_decode
    by_kind: dict[str, float] = collections.defaultdict(float)
    for f in model.backend.end_profiling():
        events = json.loads(Path(f).read_text())
        runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                      key=lambda e: e["ts"])
        prefill_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0     # each session's first run: the prompt
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] > prefill_end:
                by_kind[e.get("args", {}).get("op_name", "?")] += e["dur"]
    total = sum(by_kind.values())
    per_token = {k: v / tokens / 1000 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    return {"batch": batch, "tokens": tokens, "wall_ms_per_token": wall * 1000 / tokens,
            "nodes_ms_per_token": total / tokens / 1000, "by_kind_ms_per_token": per_token}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--blocks", action="store_true", help="per-block sessions instead of the linked graph")
    args = ap.parse_args()
    for b in (int(x) for x in args.batch.split(",")):
        r = profile(args.export, b, args.tokens, args.prompt, linked=not args.blocks)
        print(f"batch {b}: {r['wall_ms_per_token']:.2f} ms/step wall, {r['nodes_ms_per_token']:.2f} ms in nodes "
              f"({100 * r['nodes_ms_per_token'] / r['wall_ms_per_token']:.0f} %)")
        for k, v in list(r["by_kind_ms_per_token"].items())[:15]:
            print(f"  {k:28s} {v:7.3f} ms  {100 * v / r['nodes_ms_per_token']:5.1f} %")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
