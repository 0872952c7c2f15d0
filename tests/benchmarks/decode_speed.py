"""Plain-generation decode speed of two dualbrain versions, side by side in one run.

    python tests/benchmarks/decode_speed.py --before /path/to/old/checkout [--ckpt DIR] [--rounds 3]

Makes (or reuses) the mid-size MoE checkpoint (`dualbrain make-tiny --family moe --preset mid`:
hidden 1024, 12 layers, 64 experts top-8, vocab 32000, fp32, about 2.8 GB), exports it with each
version (each version's own export format), then alternates the two versions' runs (batch 1,
greedy, a 64-token prompt, `--new` tokens), each in its own process, so both see the same machine
noise. Prints one JSON line per run and a summary with the medians, including the time per token
spent outside ONNX Runtime (the runtime's own overhead, which ORT's run-to-run noise cannot hide).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]

RUN = r"""
import json, sys, time
import numpy as np
from dualbrain.runtime.generate import GenerationStats, generate
from dualbrain.runtime.model import Model
from dualbrain.runtime.sampling import SamplingParams
model = Model.load(sys.argv[1])
# time spent inside ONNX Runtime, so the runtime's own per-token overhead shows apart from ORT's noise
ort_s = [0.0]
for name in ("run", "run_linked"):
    def timed(*a, _f=getattr(model.backend, name), **k):
        t = time.perf_counter()
        try:
            return _f(*a, **k)
        finally:
            ort_s[0] += time.perf_counter() - t
    setattr(model.backend, name, timed)
prompt = list(np.random.default_rng(0).integers(0, 1000, 64))
generate(model, [prompt], SamplingParams(greedy=True, max_new_tokens=16))          # warm-up
stats = GenerationStats()
n = int(sys.argv[2])
ort_s[0] = 0.0
t0 = time.perf_counter()
generate(model, [prompt], SamplingParams(greedy=True, max_new_tokens=n), stats=stats)
wall = time.perf_counter() - t0
print(json.dumps({"decode_tok_s": stats.decode_tokens_per_s, "prefill_tok_s": stats.prefill_tokens_per_s,
                  "overhead_ms_per_token": (wall - ort_s[0]) / n * 1000}))
"""


def _env(src: Path, root: Path) -> dict:
    """An environment whose `import dualbrain` is the checkout at `src`."""
    pkg = root / f"pkg-{hashlib.sha1(str(src).encode()).hexdigest()[:10]}"
    pkg.mkdir(exist_ok=True)
    link = pkg / "dualbrain"
    if not link.exists():
        link.symlink_to(src)
    return dict(os.environ, PYTHONPATH=str(pkg), TOKENIZERS_PARALLELISM="false")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the version to compare against")
    ap.add_argument("--after", type=Path, default=HERE, help="checkout to measure (default: this one)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dualbrain-decode-speed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=200, help="new tokens per run")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "mid-moe"
    after_env = _env(args.after.resolve(), work)
    if not ckpt.is_dir():
        subprocess.run([sys.executable, "-m", "dualbrain.cli", "make-tiny", str(ckpt), "--family", "moe",
                        "--preset", "mid"], env=after_env, check=True)
    sides = {"before": _env(args.before.resolve(), work), "after": after_env}
    exports = {}
    for name, env in sides.items():
        exports[name] = work / f"export-{name}"
        if not (exports[name] / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "dualbrain.cli", "export", str(ckpt), "-o", str(exports[name])],
                           env=env, check=True)
    runs: dict[str, list[float]] = {n: [] for n in sides}
    overhead: dict[str, list[float]] = {n: [] for n in sides}
    for r in range(args.rounds):
        for name, env in sides.items():
            out = subprocess.run([sys.executable, "-c", RUN, str(exports[name]), str(args.new)], env=env,
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            runs[name].append(res["decode_tok_s"])
            overhead[name].append(res["overhead_ms_per_token"])
            print(json.dumps({"round": r, "version": name, **res}), flush=True)
    print(json.dumps({"summary": {n: {"median_decode_tok_s": statistics.median(v), "runs": v,
                                      "median_overhead_ms_per_token": statistics.median(overhead[n])}
                                  for n, v in runs.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
