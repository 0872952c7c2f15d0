"""`dualbrain bench`: speed of an export beside the engines a user would pick instead, in one run.

Each engine runs in its own process (so peak RSS is its own), behind one runner interface (below),
measured by one driver (`measure`). Runners: dualbrain (ONNX Runtime, the export), transformers eager (needs the
checkpoint), onnxruntime-genai (its own model builder on the checkpoint, when installed) and llama.cpp's
`llama-bench` (on a GGUF the user converted; it prints no tokens, so its tokens are not checked).
Every figure is the median of `runs` runs. With `rounds` > 1 every engine is measured that many
times, the order reversed every other round (A B C, C B A, ...), so that a drift in the machine's
speed during the run weighs on every engine alike, and each export runs beside its GGUF (`run_order`);
each figure is then the median over rounds, and each dualbrain engine's ratio to each llama.cpp one
the median of the per-round ratios (`versus_llama`). Greedy tokens are compared with dualbrain's
before any speed is reported. The roofline is the bytes a decode step must read (the weights one
token touches: all of them but the experts, of which top-k) over the bandwidth of a large fp32
matrix-vector product measured in the same run.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
    rounds: int = 1


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
    """Bytes/s of an fp32 matrix-vector product (numpy), best of several, over a matrix of at least 1 GiB and
    four times the last-level cache: a decode step streams its weights from memory, and a matrix the cache
    holds in part measures the cache. On the 2-core Intel host with a 300 MiB L3 of the seventeenth pass, a
    256 MiB matrix (this probe before) gave 27-47 GB/s by run and 1 GiB 25-27 (tests/benchmarks/RESULTS.md)."""
    cols = 16384
    a = np.full((roofline_matrix_bytes(last_level_cache_bytes()) // (4 * cols), cols), 0.5, np.float32)
    x = np.ones(cols, np.float32)
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def roofline_matrix_bytes(last_level_cache: int) -> int:
    """The size of gemv_bandwidth's matrix: at least 1 GiB and four times the last-level cache."""
    return max(2 ** 30, 4 * last_level_cache)


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache's size, from sysfs (0 where it cannot be read)."""
    sizes = []
    for f in caches.glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=0)


def experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a step of `batch` tokens reads, each token routing to `top_k` of
    `num_experts` at random: 8 of 64 for 8 tokens touch about 42."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_bytes(export: Path, batch: int = 1) -> int:
    """Bytes of weights one decode step of `batch` tokens reads: every weight but the experts, and of
    those the ones the step touches (`experts_touched`). A quantized export counts its quantized
    matrices at bits/8 plus one scale per block."""
    from dualbrain.exporter.checkpoint import expected_layer_shapes
    from dualbrain.runtime.dtypes import EMBEDDING, EXPERTS, LINEAR, ROUTER, dtype, quant_mode
    from dualbrain.runtime.manifest import load_manifest

    man = load_manifest(export)
    s = man.model
    item = dtype(man.dtype).itemsize
    qm = quant_mode(man.quant) if man.quant else None
    scale = dtype(qm.scale_dtype(man.dtype)).itemsize if qm else item

    def per_param(quantized: bool, bits: int | None) -> float:
        return bits / 8 + scale / (man.quant_block or qm.block) if qm and quantized else item

    def bits(role: str) -> int | None:
        return qm.role_bits(role) if qm else None

    experts = bool(qm and qm.experts)          # the modes that quantize the experts, router and embeddings
    n = s.hidden_size * (per_param(experts, bits(EMBEDDING)) + item)      # embedding row, norm
    n += s.vocab_size * s.hidden_size * per_param(True, bits(LINEAR))    # LM head
    for i in range(s.num_layers):
        for name, shape in expected_layer_shapes(s, i).items():
            p = math.prod(shape)
            if ".experts." in name:
                n += p * experts_touched(s.num_experts, s.num_experts_per_tok, batch) / s.num_experts \
                    * per_param(experts, bits(EXPERTS))
            else:
                role = ROUTER if experts and name.endswith("mlp.gate.weight") else LINEAR
                n += p * per_param(len(shape) == 2 and "conv" not in name and min(shape) > 1, bits(role))
    return int(n)


def model_bytes(man) -> int:
    """Bytes of the model's own blocks (what generation reads: no side blocks such as the MTP head,
    which stays float; llama.cpp's GGUF converted with --no-mtp is the like-for-like size)."""
    side = {f for b in man.blocks if b not in man.chain
            for f in (b.file, b.window_file) if f}
    side |= {f + ".data" for f in side}
    return sum(info.get("size", 0) for f, info in man.files.items() if f not in side)


def precision_label(man) -> str:
    """`float32`, or `int4/32 (float32)`: the quantization, its largest block and the float dtype."""
    return f"{man.quant}/{man.quant_block} ({man.dtype})" if man.quant and man.quant_block else \
        (f"{man.quant} ({man.dtype})" if man.quant else man.dtype)


def agreement_prompts(export: Path, n: int, length: int = 16, text: Path | None = None) -> list[list[int]]:
    """Prompts for the agreement check: the lines of `text` tokenized, else random ids (seeded)."""
    from dualbrain.runtime.manifest import load_manifest

    if text is None:
        return _prompts(load_manifest(export).model.vocab_size, n, length, seed=7)
    from dualbrain.runtime.chat import Tokenizer

    lines = [x for x in Path(text).read_text(encoding="utf-8").splitlines() if x.strip()]
    if not lines:
        raise DualbrainError(f"{text}: no prompts in it")
    tok = Tokenizer.from_dir(export)
    return [tok.encode(x) for x in lines[:n]]


def llama_bench(binary: str, gguf: Path, cfg: BenchConfig) -> EngineResult:
    proc = subprocess.run([binary, "-m", str(gguf), "-p", ",".join(map(str, cfg.prefill)), "-n", str(cfg.new_tokens),
                           "-t", str(os.cpu_count() or 1), "-r", str(cfg.runs), "-o", "json"],
                          capture_output=True, text=True)
    name = f"llama.cpp {gguf.name}"
    if proc.returncode != 0:
        return EngineResult(name, False, f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    rows = json.loads(proc.stdout)
    res: dict[str, Any] = {"prefill": {}, "decode": {}}
    for r in rows:
        if r.get("n_prompt"):
            res["prefill"][int(r["n_prompt"])] = float(r["avg_ts"])
        elif r.get("n_gen"):
            res["decode"][1] = {"tok_s": float(r["avg_ts"]), "p50_ms": 1000 / float(r["avg_ts"]), "p95_ms": None}
    if rows:
        res["precision"] = str(rows[0].get("model_type", "")).split()[-1] or None
        res["size_bytes"] = int(rows[0].get("model_size", gguf.stat().st_size))
    return EngineResult(name, True, "tokens not checked (llama-bench prints none)", result=res)


def bench(export: str | Path, checkpoint: str | Path | None = None, *, cfg: BenchConfig = BenchConfig(),
          peers: bool = True, llama: str | None = None, gguf: str | Path | None = None,
          precisions: tuple = (), ggufs: tuple = (), agreement_positions: int = 256,
          agreement_text: str | Path | None = None, workdir: str | Path | None = None, progress=None) -> dict:
    """Run every available engine; returns the report (what `--json` writes).

    `precisions`: other exports of the same checkpoint (e.g. `--quant int8`, `int4`), each timed like
    the first and checked by its top-1 agreement with it over `agreement_positions` teacher-forced
    positions; `ggufs` (and `gguf`): llama.cpp models to time with `llama`."""
    from dualbrain.runtime.manifest import load_manifest

    export = Path(export)
    man = load_manifest(export)
    others = [Path(p) for p in precisions]
    mans = [man] + [load_manifest(p) for p in others]
    if any(m.model.vocab_size != man.model.vocab_size or m.model.num_layers != man.model.num_layers for m in mans):
        raise DualbrainError("--precision exports must be of the same model as the first export")
    ggufs = [Path(g) for g in ([gguf] if gguf else []) + list(ggufs)]
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
    prompts = agreement_prompts(export, 4, text=agreement_text) if others else None   # bad input fails first
    llama = llama or (shutil.which("llama-bench") if ggufs else None)
    jobs = [(name, lambda name=name: _run_worker(name, export, ckpt, cfg, work)) for name in names]
    jobs += [(f"dualbrain {precision_label(m).split(' (')[0]}",
              lambda path=path: _run_worker("dualbrain", path, None, cfg, work)) for path, m in zip(others, mans[1:])]
    jobs += [(f"llama.cpp {g.name}", lambda g=g: llama_bench(llama, g, cfg)) for g in (ggufs if llama else [])]
    steps = len(jobs) * cfg.rounds + bool(others)
    by_round: list[list[EngineResult]] = [[] for _ in jobs]
    bandwidths = []
    groups = job_groups(len(names), len(others), len(jobs) - len(names) - len(others))
    order = run_order(len(names), len(others), len(groups.ggufs))
    for r in range(cfg.rounds):
        for j in (order if r % 2 == 0 else order[::-1]):
            label, run = jobs[j]
            if progress:
                progress(label if cfg.rounds == 1 else f"{label} (round {r + 1}/{cfg.rounds})",
                         sum(map(len, by_round)), steps)
            res = run()
            res.name = label
            by_round[j].append(res)
        bandwidths.append(gemv_bandwidth())
    results = [merge_rounds(rs) for rs in by_round]
    ours = results[0].result.get("greedy_ids") if results[0].ok else None
    for r in (results[j] for j in groups.peers):
        if r.ok and "greedy_ids" in r.result and ours is not None:
            r.tokens_match = r.result["greedy_ids"] == ours
            if not r.tokens_match:
                r.note = "greedy tokens differ from dualbrain's: speed not comparable"
    bw = statistics.median(bandwidths)
    rows = []
    for path, m in zip([export] + others, mans):
        step_bytes = {b: decode_bytes(path, b) for b in sorted({1, *cfg.batches})}
        rows.append({"export": str(path), "precision": precision_label(m), "dtype": m.dtype, "quant": m.quant,
                     "quant_block": m.quant_block, "size_bytes": sum(i.get("size", 0) for i in m.files.values()),
                     "model_bytes": model_bytes(m),
                     "decode_bytes_per_token": step_bytes[1], "roofline_decode_tok_s": bw / step_bytes[1],
                     # per batch size: the bytes one step reads, and the tokens/s that bandwidth allows
                     "decode_bytes_per_step": step_bytes,
                     "roofline_decode_tok_s_by_batch": {b: b * bw / n for b, n in step_bytes.items()}})
    for r, row in zip((results[j] for j in groups.exports), rows):
        r.result["size_bytes"] = row["model_bytes"]
    if others:
        from dualbrain.runtime.agreement import top1_agreement
        from dualbrain.runtime.model import Model

        if progress:
            progress("agreement", steps - 1, steps)
        found = top1_agreement(Model.load(export), [Model.load(p) for p in others], prompts, agreement_positions)
        for row, a in zip(rows[1:], found):
            row.update(agreement=a.rate, agreement_positions=a.positions, confident_positions=a.confident_positions,
                       agreement_confident=a.confident_rate if a.confident_positions else None)
    return {
        "export": str(export), "checkpoint": str(ckpt) if ckpt else None, "dtype": man.dtype,
        "size_bytes": rows[0]["size_bytes"], "config": asdict(cfg), "gemv_bytes_per_s": bw,
        "decode_bytes_per_token": rows[0]["decode_bytes_per_token"],
        "roofline_decode_tok_s": rows[0]["roofline_decode_tok_s"],
        "roofline_decode_tok_s_by_batch": rows[0]["roofline_decode_tok_s_by_batch"], "precisions": rows,
        "engines": [{"name": r.name, "ok": r.ok, "note": r.note, "tokens_match": r.tokens_match, **r.result}
                    for r in results],
        **({"gemv_bytes_per_s_by_round": bandwidths} if cfg.rounds > 1 else {}),
        "versus_llama": versus_llama([by_round[j] for j in groups.exports], [by_round[j] for j in groups.ggufs]),
    }


class JobGroups(NamedTuple):
    """bench()'s jobs, laid out [dualbrain, peers..., precisions..., GGUFs...], by kind (job indices)."""
    exports: list[int]     # dualbrain's exports: EXPORT, then each --precision
    ggufs: list[int]       # llama.cpp's models
    peers: list[int]       # transformers, onnxruntime-genai


def job_groups(n_names: int, n_precisions: int, n_ggufs: int) -> JobGroups:
    return JobGroups([0, *range(n_names, n_names + n_precisions)],
                     list(range(n_names + n_precisions, n_names + n_precisions + n_ggufs)),
                     list(range(1, n_names)))


def run_order(n_names: int, n_precisions: int, n_ggufs: int) -> list[int]:
    """The order engines run in, as indices into [dualbrain, peers..., precisions..., GGUFs...]: each
    dualbrain export beside the GGUF of the same position (EXPORT by the first, the i-th --precision by
    the next: f32, Q8_0, Q4_0 in the usual call), so the pairs compared are measured minutes apart at
    most; the peers last."""
    ours, theirs, peers = job_groups(n_names, n_precisions, n_ggufs)
    pairs = [j for k in range(max(len(ours), len(theirs))) for j in (ours[k:k + 1] + theirs[k:k + 1])]
    return pairs + peers


def _median_figures(results: list[dict]) -> dict:
    """Prefill tok/s per length and decode figures per batch: the median over `results` (one per round)."""
    med = lambda xs: statistics.median(xs) if xs and None not in xs else None  # noqa: E731
    out = {"prefill": {n: med([r["prefill"][n] for r in results]) for n in results[0]["prefill"]}, "decode": {}}
    for b, d in results[0]["decode"].items():
        out["decode"][b] = {k: med([r["decode"][b][k] for r in results]) for k in d}
    return out


def merge_rounds(rounds: list[EngineResult]) -> EngineResult:
    """One engine's rounds as one result: the first failure if any, else the median of each figure, the
    largest peak RSS, the first round's tokens and, with several rounds, each round's figures."""
    failed = next((r for r in rounds if not r.ok), None)
    if failed is not None or len(rounds) == 1:
        return failed or rounds[0]
    first = rounds[0]
    result = {**first.result, **_median_figures([r.result for r in rounds])}
    if any("peak_rss_mib" in r.result for r in rounds):
        result["peak_rss_mib"] = max(r.result.get("peak_rss_mib", 0) for r in rounds)
    result["rounds"] = [{"prefill": r.result["prefill"],
                         "decode": {b: d["tok_s"] for b, d in r.result["decode"].items()}} for r in rounds]
    return EngineResult(first.name, True, first.note, first.tokens_match, result)


def versus_llama(ours: list[list[EngineResult]], theirs: list[list[EngineResult]]) -> list[dict]:
    """Each dualbrain engine (its rounds) against each llama.cpp one: the median over rounds of the
    round's ratio of batch-1 decode tok/s and of prefill tok/s at each length both measured. An engine
    that failed a round has no ratio."""
    out = []
    for a in (rs for rs in ours if all(r.ok for r in rs)):
        for b in (rs for rs in theirs if all(r.ok for r in rs)):
            pairs = list(zip((r.result for r in a), (r.result for r in b)))
            lengths = [n for n in pairs[0][0]["prefill"] if n in pairs[0][1]["prefill"]]
            decode = all(1 in x["decode"] and 1 in y["decode"] for x, y in pairs)
            out.append({"engine": a[0].name, "llama": b[0].name,
                        "decode_b1": statistics.median(x["decode"][1]["tok_s"] / y["decode"][1]["tok_s"]
                                                       for x, y in pairs) if decode else None,
                        "prefill": {n: statistics.median(x["prefill"][n] / y["prefill"][n] for x, y in pairs)
                                    for n in lengths},
                        "rounds": len(pairs)})
    return out


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
    t.add_column("size\nMiB", justify="right")
    t.add_column("peak RSS\nMiB", justify="right")
    t.add_column("tokens")
    for e in report["engines"]:
        if not e["ok"]:
            t.add_row(e["name"], *[""] * (len(cfg["prefill"]) + 2 * len(cfg["batches"]) + 2), e["note"])
            continue
        row = [e["name"]]
        row += [f"{e['prefill'][n]:.0f}" if n in e["prefill"] else "" for n in cfg["prefill"]]
        for b in cfg["batches"]:
            d = e["decode"].get(b)
            row += [f"{d['tok_s']:.1f}", f"{d['p50_ms']:.1f} / {d['p95_ms']:.1f}" if d["p95_ms"] else
                    f"{d['p50_ms']:.1f}"] if d else ["", ""]
        row.append(f"{e['size_bytes'] / 2**20:.0f}" if e.get("size_bytes") else "")
        row.append(f"{e['peak_rss_mib']:.0f}" if e.get("peak_rss_mib") else "")
        row.append({None: "reference" if e["name"] == "dualbrain" else "-", True: "same", False: "DIFFERENT"}
                   [e["tokens_match"]] + (f" ({e['note']})" if e["note"] and e["tokens_match"] is not False else ""))
        t.add_row(*row)
    Console().print(t)
    if len(report.get("precisions", [])) > 1:
        p = Table(title="precisions (agreement: top-1 with the first over teacher-forced positions)")
        batches = list(report["precisions"][0].get("roofline_decode_tok_s_by_batch", {1: None}))
        for c in ("precision", "model MiB", *[f"roofline b{b} tok/s" for b in batches], "top-1 agreement",
                  "where the reference is sure"):
            p.add_column(c, justify="left" if c == "precision" else "right")
        for r in report["precisions"]:
            agree = [f"{r['agreement']:.1%} of {r['agreement_positions']}",
                     f"{r['agreement_confident'] or 0:.1%} of {r['confident_positions']}"] if "agreement" in r \
                else ["reference", ""]
            roof = r.get("roofline_decode_tok_s_by_batch", {1: r["roofline_decode_tok_s"]})
            p.add_row(r["precision"], f"{r['model_bytes'] / 2**20:.0f}", *[f"{roof[b]:.1f}" for b in batches], *agree)
        Console().print(p)
    if report.get("versus_llama"):
        v = Table(title="against llama.cpp (the median of each round's ratio)")
        lengths = sorted({n for r in report["versus_llama"] for n in r["prefill"]})
        for c in ("dualbrain", "llama.cpp", "decode b1", *[f"prefill {n}" for n in lengths]):
            v.add_column(c, justify="left" if c in ("dualbrain", "llama.cpp") else "right")
        for r in report["versus_llama"]:
            v.add_row(r["engine"], r["llama"], f"{r['decode_b1']:.2f}×" if r["decode_b1"] else "",
                      *[f"{r['prefill'][n]:.2f}×" if n in r["prefill"] else "" for n in lengths])
        Console().print(v)
    print(f"roofline: {report['decode_bytes_per_token'] / 2**20:.0f} MiB read per decode token at "
          f"{report['gemv_bytes_per_s'] / 1e9:.1f} GB/s (fp32 GEMV, this run"
          f"{', median over rounds' if 'gemv_bytes_per_s_by_round' in report else ''}) = "
          f"{report['roofline_decode_tok_s']:.1f} tok/s at batch 1")
    roof = report.get("roofline_decode_tok_s_by_batch", {})
    for b, tok_s in roof.items():
        if int(b) > 1:
            m = report["precisions"][0]["decode_bytes_per_step"][b]
            print(f"          batch {b}: {m / 2**20:.0f} MiB per step (the experts its tokens touch at random "
                  f"routing) = {tok_s:.1f} tok/s")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] or None, json.loads(sys.argv[4]), sys.argv[5])
