"""Endurance: resident memory over a 10,000-token generation (issue 5).

    python tests/benchmarks/endurance.py [--workdir /tmp/dualbrain-endurance] [--tokens 10000]

Makes a tiny checkpoint, exports it with a context long enough, then decodes greedily for
`--tokens` tokens (EOS ignored) and samples RSS. After warm-up, RSS may grow by no more than the
KV cache's own growth plus 10 %. Prints one JSON line; exit code 0 when within budget.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dualbrain-endurance"))
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()

    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny
    from dualbrain.runtime.generate import decode_one, prefill
    from dualbrain.runtime.model import Model

    ckpt, out = args.workdir / "ckpt", args.workdir / "onnx"
    if not (out / "manifest.json").is_file():
        make_tiny(ckpt, family="moe", layout="causal")
        export_checkpoint(ckpt, out, max_context=args.tokens + 64)
    model = Model.load(out)
    proc = psutil.Process()
    state, logits = prefill(model, [[5, 17, 300, 42]])
    kv_per_token = sum(int(np.prod([d for d in s.shape if isinstance(d, int)])) * np.dtype(model.np_dtype(s.dtype)).itemsize
                       for b in model.layers for s in b.state if s.input.startswith("past_"))
    samples = []
    t0 = time.perf_counter()
    for i in range(args.tokens):
        tok = logits.argmax(-1)
        logits = decode_one(model, state, tok)
        if i == args.warmup or i % 1000 == 999:
            samples.append((i + 1, proc.memory_info().rss))
    secs = time.perf_counter() - t0
    (w_tok, w_rss), (e_tok, e_rss) = samples[0], samples[-1]
    kv_growth = kv_per_token * (e_tok - w_tok)
    budget = int(kv_growth * 1.1)
    growth = e_rss - w_rss
    result = {"tokens": args.tokens, "warmup_tokens": w_tok, "rss_after_warmup": w_rss, "rss_end": e_rss,
              "rss_growth": growth, "kv_growth_bytes": kv_growth, "budget_bytes": budget, "ok": growth <= budget,
              "decode_tokens_per_s": args.tokens / secs, "samples": samples}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
