"""`dualbrain bench`: speed of an export beside the engines a user would pick instead, in one run.

Each engine runs in its own process (so peak RSS is its own), behind one runner interface (below),
measured by one driver (`measure`). Runners: dualbrain (ONNX Runtime, the export), transformers eager (needs the
checkpoint), onnxruntime-genai (its own model builder on the checkpoint, when installed) and llama.cpp's
`llama-bench` (on a GGUF the user converted; it prints no tokens, so its tokens are not checked).
Every figure is the median of `runs` runs. Greedy tokens are compared with dualbrain's before any
speed is reported. The roofline is the bytes a decode step must read (the weights one token touches:
all of them but the experts, of which top-k) over the bandwidth of a large fp32 matrix-vector product
measured in the same run.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dualbrain.errors import DualbrainError

CHECK_TOKENS = 32        # greedy tokens compared between engines


@dataclass(frozen=True)
class BenchConfig:
    prefill: tuple[int, ...] = (64, 512, 2048)
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 200
    prompt_len: int = 64
    runs: int = 3


def _ms_percentiles(times: list[float]) -> tuple[float, float]:
    a = np.asarray(times) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 1000), length).tolist() for _ in range(n)]


# ---- runners (each runs inside its own worker process) ------------------------------------------
# A runner has `vocab`, `max_context`, `time_prefill(ids) -> seconds` (one prompt, from scratch) and
# `decode(prompts, n) -> (row 0's n greedy ids, the times of the n - 1 steps after the first token)`.

class DualbrainRunner:
    def __init__(self, export: str, ckpt: str | None, workdir: str):
        from dualbrain.runtime.model import Model

        self.model = Model.load(export)
        self.vocab, self.max_context = self.model.vocab_size, self.model.max_context

    def time_prefill(self, ids: list[int]) -> float:
        st = self.model.new_state(1, capacity=len(ids) + 1)
        t = time.perf_counter()
        self.model.forward(np.asarray([ids]), st)
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> tuple[list[int], list[float]]:
        from dualbrain.runtime.generate import decode_one, prefill

        state, logits = prefill(self.model, prompts, new_tokens=n)
        return _greedy_loop(lambda: logits.argmax(-1), n, lambda tok: decode_one(self.model, state, tok))


class TransformersRunner:
    def __init__(self, export: str, ckpt: str | None, workdir: str):
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        text = self.model.config.get_text_config()
        self.vocab, self.max_context = text.vocab_size, text.max_position_embeddings

    def time_prefill(self, ids: list[int]) -> float:
        with self.torch.no_grad():
            t = time.perf_counter()
            self.model(input_ids=self.torch.tensor([ids]), use_cache=True)
            return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> tuple[list[int], list[float]]:
        torch = self.torch
        with torch.no_grad():
            res = self.model(input_ids=torch.tensor(prompts), use_cache=True)
            box = {"cache": res.past_key_values, "logits": res.logits[:, -1]}

            def step(tok):
                r = self.model(input_ids=torch.as_tensor(tok)[:, None], past_key_values=box["cache"], use_cache=True)
                box["cache"], box["logits"] = r.past_key_values, r.logits[:, -1]
                return box["logits"]
            return _greedy_loop(lambda: box["logits"].argmax(-1).numpy(), n, lambda tok: step(tok).argmax(-1).numpy(),
                                step_returns_tokens=True)


class OnnxruntimeGenaiRunner:
    def __init__(self, export: str, ckpt: str | None, workdir: str):
        import onnxruntime_genai as og

        built = Path(workdir) / "onnxruntime-genai"
        if not (built / "genai_config.json").is_file():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", ckpt, "-o", str(built),
                            "-p", "fp32", "-e", "cpu", "-c", str(Path(workdir) / "onnxruntime-genai-cache")],
                           check=True, capture_output=True)
        self.og, self.model = og, og.Model(str(built))
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        self.vocab, self.max_context = text["vocab_size"], text.get("max_position_embeddings", 4096)

    def _generator(self, batch: int, max_length: int):
        p = self.og.GeneratorParams(self.model)
        p.set_search_options(max_length=max_length, do_sample=False, batch_size=batch)
        return self.og.Generator(self.model, p)

    def time_prefill(self, ids: list[int]) -> float:
        g = self._generator(1, len(ids) + 2)
        t = time.perf_counter()
        g.append_tokens(np.asarray([ids], np.int32))
        g.generate_next_token()
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> tuple[list[int], list[float]]:
        g = self._generator(len(prompts), len(prompts[0]) + n + 1)
        g.append_tokens(np.asarray(prompts, np.int32))
        g.generate_next_token()                      # the first token comes from the prefill

        def step(tok):
            g.generate_next_token()
            return g.get_next_tokens()
        return _greedy_loop(lambda: g.get_next_tokens(), n, step, step_returns_tokens=True)


def _greedy_loop(first, n: int, step, *, step_returns_tokens: bool = False) -> tuple[list[int], list[float]]:
    """n greedy tokens: the first from `first()`, each next from a timed `step(tokens)` (which returns
    logits, or the next tokens with `step_returns_tokens`)."""
    tok = np.asarray(first())
    ids, times = [int(tok[0])], []
    while len(ids) < n:
        t = time.perf_counter()
        out = step(tok)
        times.append(time.perf_counter() - t)
        tok = np.asarray(out) if step_returns_tokens else np.asarray(out).argmax(-1)
        ids.append(int(tok[0]))
    return ids, times


def measure(runner, cfg: BenchConfig) -> dict:
    """The figures of one runner: medians over `cfg.runs` runs, after one warm-up run each."""
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    for length in cfg.prefill:
        if length > runner.max_context:
            continue
        ids = _prompts(runner.vocab, 1, length, seed=length)[0]
        times = [runner.time_prefill(ids) for _ in range(cfg.runs + 1)][1:]
        out["prefill"][length] = length / statistics.median(times)
    for batch in cfg.batches:
        prompts = _prompts(runner.vocab, batch, cfg.prompt_len)
        rates, steps = [], []
        for r in range(cfg.runs + 1):
            ids, step_times = runner.decode(prompts, cfg.new_tokens)
            if r:
                rates.append(batch * len(step_times) / sum(step_times))
                steps += step_times
            if batch == cfg.batches[0]:
                out["greedy_ids"] = ids[:CHECK_TOKENS]
        p50, p95 = _ms_percentiles(steps)
        out["decode"][batch] = {"tok_s": statistics.median(rates), "p50_ms": p50, "p95_ms": p95}
    return out


RUNNERS = {"dualbrain": DualbrainRunner, "transformers": TransformersRunner,
           "onnxruntime-genai": OnnxruntimeGenaiRunner}


def _worker(name: str, export: str, ckpt: str | None, cfg: dict, workdir: str) -> None:
    runner = RUNNERS[name](export, ckpt, workdir)
    res = measure(runner, BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}))
    res["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(res))


# ---- the parent ---------------------------------------------------------------------------------

@dataclass
class EngineResult:
    name: str
    ok: bool
    note: str = ""
    tokens_match: bool | None = None
    result: dict = field(default_factory=dict)


def _run_worker(name: str, export: Path, ckpt: Path | None, cfg: BenchConfig, workdir: Path) -> EngineResult:
    proc = subprocess.run([sys.executable, "-m", "dualbrain.bench", name, str(export), str(ckpt or ""),
                           json.dumps(asdict(cfg)), str(workdir)], capture_output=True, text=True)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return EngineResult(name, False, f"failed: {tail[:200]}")
    res = json.loads(line[len("RESULT "):])
    res["prefill"] = {int(k): v for k, v in res["prefill"].items()}
    res["decode"] = {int(k): v for k, v in res["decode"].items()}
    return EngineResult(name, True, result=res)


def gemv_bandwidth(seconds: float = 1.0) -> float:
    """Bytes/s of a 256 MiB fp32 matrix-vector product (numpy), best of several."""
    a = np.random.default_rng(0).standard_normal((4096, 16384), dtype=np.float32)
    x = np.ones(16384, np.float32)
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def decode_bytes(export: Path) -> int:
    """Bytes of weights one decode token reads: every weight but the experts, and top-k of those."""
    from dualbrain.exporter.checkpoint import expected_layer_shapes
    from dualbrain.runtime.dtypes import dtype
    from dualbrain.runtime.manifest import load_manifest

    man = load_manifest(export)
    s = man.model
    n = s.hidden_size + s.hidden_size + s.vocab_size * s.hidden_size        # embedding row, final norm, head
    for i in range(s.num_layers):
        for name, shape in expected_layer_shapes(s, i).items():
            p = math.prod(shape)
            n += p * s.num_experts_per_tok // s.num_experts if ".experts." in name else p
    return n * dtype(man.dtype).itemsize


def llama_bench(binary: str, gguf: Path, cfg: BenchConfig) -> EngineResult:
    proc = subprocess.run([binary, "-m", str(gguf), "-p", ",".join(map(str, cfg.prefill)), "-n", str(cfg.new_tokens),
                           "-t", str(os.cpu_count() or 1), "-r", str(cfg.runs), "-o", "json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return EngineResult("llama.cpp", False, f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    rows = json.loads(proc.stdout)
    res: dict[str, Any] = {"prefill": {}, "decode": {}}
    for r in rows:
        if r.get("n_prompt"):
            res["prefill"][int(r["n_prompt"])] = float(r["avg_ts"])
        elif r.get("n_gen"):
            res["decode"][1] = {"tok_s": float(r["avg_ts"]), "p50_ms": 1000 / float(r["avg_ts"]), "p95_ms": None}
    return EngineResult("llama.cpp", True, "tokens not checked (llama-bench prints none)", result=res)


def bench(export: str | Path, checkpoint: str | Path | None = None, *, cfg: BenchConfig = BenchConfig(),
          peers: bool = True, llama: str | None = None, gguf: str | Path | None = None,
          workdir: str | Path | None = None, progress=None) -> dict:
    """Run every available engine; returns the report (what `--json` writes)."""
    from dualbrain.runtime.manifest import load_manifest

    export = Path(export)
    man = load_manifest(export)
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and not (ckpt / "config.json").is_file():
        raise DualbrainError(f"--checkpoint {ckpt}: no config.json there")
    work = Path(workdir) if workdir else export.parent / f"{export.name}.bench"
    work.mkdir(parents=True, exist_ok=True)
    names = ["dualbrain"]
    if peers and ckpt is not None:
        names.append("transformers")
        import importlib.util

        if importlib.util.find_spec("onnxruntime_genai") is not None:
            names.append("onnxruntime-genai")
    results = []
    for i, name in enumerate(names):
        if progress:
            progress(name, i, len(names) + (llama is not None))
        results.append(_run_worker(name, export, ckpt, cfg, work))
    llama = llama or (shutil.which("llama-bench") if gguf else None)
    if llama and gguf:
        if progress:
            progress("llama.cpp", len(names), len(names) + 1)
        results.append(llama_bench(llama, Path(gguf), cfg))
    ours = results[0].result.get("greedy_ids") if results[0].ok else None
    for r in results[1:]:
        if r.ok and "greedy_ids" in r.result and ours is not None:
            r.tokens_match = r.result["greedy_ids"] == ours
            if not r.tokens_match:
                r.note = "greedy tokens differ from dualbrain's: speed not comparable"
    bw = gemv_bandwidth()
    step_bytes = decode_bytes(export)
    size = sum(info.get("size", 0) for info in man.files.values())
    return {
        "export": str(export), "checkpoint": str(ckpt) if ckpt else None, "dtype": man.dtype, "size_bytes": size,
        "config": asdict(cfg), "gemv_bytes_per_s": bw, "decode_bytes_per_token": step_bytes,
        "roofline_decode_tok_s": bw / step_bytes,
        "engines": [{"name": r.name, "ok": r.ok, "note": r.note, "tokens_match": r.tokens_match, **r.result}
                    for r in results],
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    t = Table(title=f"{report['export']} ({report['dtype']}, {report['size_bytes'] / 2**30:.2f} GiB)")
    t.add_column("engine")
    for n in cfg["prefill"]:
        t.add_column(f"prefill {n}\ntok/s", justify="right")
    for b in cfg["batches"]:
        t.add_column(f"decode b{b}\ntok/s", justify="right")
        t.add_column(f"b{b} ms/{'token' if b == 1 else 'step'}\nP50 / P95", justify="right")
    t.add_column("peak RSS\nMiB", justify="right")
    t.add_column("tokens")
    for e in report["engines"]:
        if not e["ok"]:
            t.add_row(e["name"], *[""] * (len(cfg["prefill"]) + 2 * len(cfg["batches"]) + 1), e["note"])
            continue
        row = [e["name"]]
        row += [f"{e['prefill'][n]:.0f}" if n in e["prefill"] else "" for n in cfg["prefill"]]
        for b in cfg["batches"]:
            d = e["decode"].get(b)
            row += [f"{d['tok_s']:.1f}", f"{d['p50_ms']:.1f} / {d['p95_ms']:.1f}" if d["p95_ms"] else
                    f"{d['p50_ms']:.1f}"] if d else ["", ""]
        row.append(f"{e['peak_rss_mib']:.0f}" if e.get("peak_rss_mib") else "")
        row.append({None: "reference" if e["name"] == "dualbrain" else "-", True: "same", False: "DIFFERENT"}
                   [e["tokens_match"]] + (f" ({e['note']})" if e["note"] and e["tokens_match"] is not False else ""))
        t.add_row(*row)
    Console().print(t)
    print(f"roofline: {report['decode_bytes_per_token'] / 2**20:.0f} MiB read per decode token at "
          f"{report['gemv_bytes_per_s'] / 1e9:.1f} GB/s (fp32 GEMV, this run) = "
          f"{report['roofline_decode_tok_s']:.1f} tok/s at batch 1")


# ---- the solver modes (`dualbrain bench --solver`) -------------------------------------------------

@dataclass(frozen=True)
class SolverBenchConfig:
    new_tokens: int = 64
    prompt_len: int = 32
    prompts: int = 3            # each answered alone (batch 1); latency percentiles over all of them
    draft_tokens: int = 4
    threshold: float = 0.5


def predicted_speedup(alpha: float, k: float, c: float, v: float = 1.0) -> float:
    """Leviathan et al.'s cost model: tokens per round over the round's cost in target decode steps,
    (1 - a^(k+1)) / ((1 - a)(k c + v)), a the per-draft acceptance rate, c the draft step's cost
    relative to the target's, v the verify call's (1 in the paper: a (k+1)-token call costs one step)."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + v)


def _median_seconds(fn, n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_seconds(model, prompt: list[int]) -> float:
    """A one-token decode step of `model` after `prompt` (median)."""
    state = model.new_state(1, capacity=len(prompt) + 64)
    model.forward(np.asarray([prompt], np.int64), state)
    state.mark()

    def one():
        model.forward(np.asarray([[prompt[-1]]], np.int64), state)
        state.rollback(0, 0)
    return _median_seconds(one)


def verify_seconds(model, prompt: list[int], n: int) -> float:
    """An n-token call after a mark, rolled back (a verify call: per-position GDN states), median."""
    state = model.new_state(1, capacity=len(prompt) + 64)
    model.forward(np.asarray([prompt], np.int64), state)
    state.mark()
    ids = np.asarray([prompt[:n]], np.int64)

    def one():
        model.forward(ids, state, logits_to_keep=n)
        state.rollback(0, 0)
    return _median_seconds(one)


def mtp_step_seconds(drafter, prompt: list[int]) -> float:
    """One chained draft of the MTP head (one pair) after a cache of the prompt's length (median)."""
    st = drafter._new_state(1, len(prompt) + 64)
    h = np.zeros((len(prompt), drafter.model.spec.hidden_size), drafter._hidden_dtype)
    drafter._run(st, {0: (h, prompt)}, drafter.normalize)
    st.mark()

    def one():
        drafter._run(st, {0: (h[:1], prompt[:1])}, 0)
        st.rollback(0, 0)
    return _median_seconds(one)


def _answer_all(model, mode, prompts: list[list[int]], n: int) -> tuple[list, list[float]]:
    """Each prompt alone on a one-row engine (greedy, n new tokens); the generations and each one's
    decode ms per token (after the first token)."""
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.sampling import SamplingParams

    gens, ms = [], []
    for p in prompts:
        engine = Engine(model, max_batch=1, prefill_chunk=len(p), capacity=len(p) + n + 16, mode=mode)
        req = engine.submit(p, SamplingParams(greedy=True, max_new_tokens=n))
        gens.append(req.result())
        k = len(req.generation.new_ids) - 1
        if k > 0:
            ms.append(1000 * (req.t_done - req.t_first) / k)
    return gens, ms


def _row(gens, ms) -> dict[str, Any]:
    p50, p95 = _ms_percentiles([m / 1000 for m in ms])
    return {"tok_s": 1000 / p50, "p50_ms": p50, "p95_ms": p95, "new_tokens": sum(len(g.new_ids) for g in gens)}


def bench_solver(large_dir: str | Path, small_dir: str | Path | None = None, bridges_dir: str | Path | None = None,
                 *, cfg: SolverBenchConfig = SolverBenchConfig(), modes: tuple[str, ...] | None = None,
                 progress=None) -> dict:
    """The large model alone, the small one alone and every solver mode the pair allows (`modes`:
    only these), on the same prompts in one run: speed, P50/P95 ms per token, acceptance, the cost
    ratio and the cost model's prediction beside the measured speedup; for fused, its cost against
    the two models alone and the overlap its parallel small model achieves."""
    from dualbrain.runtime.engine import PlainDecode
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.solver import MODES, SolverOptions
    from dualbrain.runtime.solver.drafters import MtpDrafter
    from dualbrain.runtime.solver.pair import check_pair

    if small_dir is not None:
        check_pair(large_dir, small_dir)
    large = Model.load(large_dir)
    small = Model.load(small_dir) if small_dir is not None else None
    has_mtp = large.manifest.side("mtp") is not None
    prompts = _prompts(large.vocab_size, cfg.prompts, cfg.prompt_len, seed=7)
    options = SolverOptions(draft_tokens=cfg.draft_tokens, threshold=cfg.threshold,
                            bridges=str(bridges_dir) if bridges_dir else None)
    runs = [("large", large, None)] + ([("small", small, None)] if small is not None else [])
    runs += [(name, large, m) for name, m in MODES.items() if (small is not None or not m.needs_small)
             and (bridges_dir is not None or not m.needs_bridges) and (name != "mtp" or has_mtp)
             and (modes is None or name in modes)]
    t_large = step_seconds(large, prompts[0])
    cost = {"speculative": step_seconds(small, prompts[0]) / t_large if small is not None else None,
            "mtp": mtp_step_seconds(MtpDrafter(large), prompts[0]) / t_large if has_mtp else None}
    report: dict[str, dict] = {}
    reference = None
    for i, (name, model, spec) in enumerate(runs):
        if progress:
            progress(name, i, len(runs))
        mode = spec.build(large, small, options) if spec is not None else PlainDecode()
        gens, ms = _answer_all(model, mode, prompts, cfg.new_tokens)
        row = _row(gens, ms)
        if name == "large":
            reference = [g.new_ids for g in gens]
        else:
            row["tokens_match_large"] = [g.new_ids for g in gens] == reference
            row["speedup"] = report["large"]["p50_ms"] / row["p50_ms"]
        drafted, accepted, rounds = (sum(getattr(g, f) for g in gens) for f in ("drafted", "accepted", "rounds"))
        if name in cost:
            alpha = accepted / drafted if drafted else 0.0
            k = drafted / rounds if rounds else 0.0
            v = verify_seconds(large, prompts[0], max(1, round(k)) + 1) / t_large
            row.update(acceptance_rate=alpha, mean_k=k, mean_accepted=accepted / rounds if rounds else 0.0,
                       tokens_per_round=row["new_tokens"] / rounds if rounds else 0.0, cost_ratio=cost[name],
                       verify_cost=v, predicted_speedup=predicted_speedup(alpha, k, cost[name]),
                       predicted_speedup_with_verify_cost=predicted_speedup(alpha, k, cost[name], v))
        if name == "cascade":
            row.update(escalation_rate=sum(g.escalations for g in gens) / max(1, rounds),
                       window=cfg.draft_tokens, threshold=cfg.threshold)
        if name == "fused":
            # the same with the small model on its own thread and without: what the overlap gives here
            par, seq = (_row(*_answer_all(model, spec.build(large, small, replace(options, parallel=p)), prompts,
                                          cfg.new_tokens)) for p in (True, False))
            both = report["large"]["p50_ms"] + report["small"]["p50_ms"]
            row.update(overhead=row["p50_ms"] / report["large"]["p50_ms"], cost_vs_both_alone=row["p50_ms"] / both,
                       parallel_p50_ms=par["p50_ms"], sequential_p50_ms=seq["p50_ms"],
                       overlap=1 - par["p50_ms"] / seq["p50_ms"])
        report[name] = row
    return {"large": str(large_dir), "small": str(small_dir) if small_dir else None,
            "bridges": str(bridges_dir) if bridges_dir else None, "config": asdict(cfg), "modes": report}


def print_solver_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x, spec):
        return "" if x is None else format(x, spec)

    t = Table(title=f"solver modes: large {report['large']}, small {report['small'] or '-'} "
                    f"(batch 1, greedy, {report['config']['new_tokens']} new tokens)")
    for col in ("mode", "tok/s", "ms/tok P50/P95", "speedup", "model", "model(v)", "accept", "k", "tok/rnd", "c", "v",
                "escal", "vs L+S", "overlap", "=large"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for name, m in report["modes"].items():
        t.add_row(name, f(m["tok_s"], ".1f"), f"{m['p50_ms']:.1f}/{m['p95_ms']:.1f}", f(m.get("speedup"), ".2f"),
                  f(m.get("predicted_speedup"), ".2f"), f(m.get("predicted_speedup_with_verify_cost"), ".2f"),
                  f(m.get("acceptance_rate"), ".2f"), f(m.get("mean_k"), ".1f"), f(m.get("tokens_per_round"), ".2f"),
                  f(m.get("cost_ratio"), ".2f"), f(m.get("verify_cost"), ".2f"), f(m.get("escalation_rate"), ".2f"),
                  f(m.get("cost_vs_both_alone"), ".2f"), f(m.get("overlap"), ".2f"),
                  {None: "", True: "yes", False: "no"}[m.get("tokens_match_large")])
    Console(width=max(140, Console().width)).print(t)
    print("speedup: measured P50 ms/token of large alone over the mode's, this run; model: (1 - a^(k+1)) / "
          "((1 - a)(k c + 1)) from the measured acceptance a, drafts per round k and draft cost c (a draft step "
          "over a large decode step); model(v): the same with the verify call's measured cost v instead of 1; "
          "vs L+S: fused ms/token over large alone + small alone; overlap: 1 - fused with the small model on its "
          "own thread over fused with it run first")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] or None, json.loads(sys.argv[4]), sys.argv[5])
