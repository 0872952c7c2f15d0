"""`dualbrain bench --solver`: the large model alone, the small one alone and every solver mode the
pair allows, answering the same prompts one at a time (batch 1, greedy) in one run.

With questions (a JSONL of {"prompt", "answer"}; default: the committed tiny pair's held-out questions,
recipes/pair), each mode's answers are scored (exact match of the answer text) and latency is per
answer; the report's `baseline` is the most-common-answer rate. Without, random prompts of a fixed
length are answered for `new_tokens` tokens and latency is per token. Either way: speculative/mtp's
acceptance, drafts and tokens per round, the draft's cost ratio c and the speedup the cost model
predicts; cascade's escalation rate; fused's overhead over the large model alone and the overlap its
parallel small model achieves.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dualbrain.errors import DualbrainError, read_jsonl


@dataclass(frozen=True)
class SolverBenchConfig:
    new_tokens: int = 64
    prompt_len: int = 32
    prompts: int = 3            # each answered alone (batch 1); latency percentiles over all of them
    draft_tokens: int = 4
    threshold: float = 0.5


@dataclass(frozen=True)
class Question:
    """A question with its answer; `digit_prompt` (the same question the large model can answer alone)
    and `facts` (what the small model knows: prompt -> answer) add the per-model checks."""
    prompt: str
    answer: str
    digit_prompt: str | None = None
    facts: dict[str, str] = field(default_factory=dict)


def read_questions(path: str | Path) -> list[Question]:
    out = []
    for n, d in read_jsonl(Path(path), "questions file"):
        if not (isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(d.get("answer"), str)):
            raise DualbrainError(f'{path}: line {n} needs {{"prompt": "…", "answer": "…"}}')
        facts = d.get("facts") or {}
        if not (isinstance(facts, dict) and all(isinstance(v, str) for v in facts.values())):
            raise DualbrainError(f"{path}: line {n}: facts must map prompts to answer strings")
        out.append(Question(d["prompt"], d["answer"], d.get("digit_prompt"), facts))
    if not out:
        raise DualbrainError(f"{path}: no questions")
    return out


def baseline(questions: list[Question]) -> float:
    """The most-common-answer rate: what always giving one answer scores."""
    return Counter(q.answer for q in questions).most_common(1)[0][1] / len(questions)


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
    ids = np.asarray([(prompt * n)[:n]], np.int64)

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


@dataclass
class Answers:
    gens: list
    answer_ms: list[float]          # each prompt's whole answer, prefill included
    token_ms: list[float]           # each prompt's decode ms per token after its first

    def row(self, per_answer: bool) -> dict[str, Any]:
        ms = self.answer_ms if per_answer else self.token_ms
        p50, p95 = (float(np.percentile(ms, q)) for q in (50, 95))
        tokens = sum(len(g.new_ids) for g in self.gens)
        row = {"p50_ms": p50, "p95_ms": p95, "new_tokens": tokens}
        if per_answer:
            row.update(ms_per_token=sum(self.answer_ms) / max(1, tokens), tok_s=1000 * tokens / sum(self.answer_ms))
        else:
            row.update(ms_per_token=p50, tok_s=1000 / p50)
        return row


def _answer_all(model, mode, prompts: list[list[int]], n: int) -> Answers:
    """Each prompt alone on a one-row engine (greedy, at most n new tokens)."""
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.sampling import SamplingParams

    params = SamplingParams(greedy=True, max_new_tokens=n)
    out = Answers([], [], [])
    for p in prompts:
        engine = Engine(model, max_batch=1, prefill_chunk=len(p), capacity=len(p) + n + 16, mode=mode)
        req = engine.submit(p, params)
        out.gens.append(req.result())
        out.answer_ms.append(1000 * (req.t_done - req.t_start))
        k = len(req.generation.new_ids) - 1
        if k > 0:
            out.token_ms.append(1000 * (req.t_done - req.t_first) / k)
    return out


def _accuracy(model, prompts: dict[str, str], n: int, whole: bool = True) -> float:
    """Greedy answer rate of `model` alone over prompt -> answer, in one batch: the whole answer (up to
    the end token), or with `whole=False` its first tokens (a fact the model goes on after: "kazo3+…")."""
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.sampling import SamplingParams

    items = sorted(prompts.items())
    tok = model.tokenizer
    gens = generate(model, [tok.encode(p) for p, _ in items], SamplingParams(greedy=True, max_new_tokens=n))
    if whole:
        return sum(g.text.strip() == a for g, (_, a) in zip(gens, items)) / len(items)
    return sum(g.new_ids[:len(tok.encode(a))] == tok.encode(a) for g, (_, a) in zip(gens, items)) / len(items)


def bench_solver(large_dir: str | Path, small_dir: str | Path | None = None, bridges_dir: str | Path | None = None,
                 *, cfg: SolverBenchConfig = SolverBenchConfig(), questions: list[Question] | None = None,
                 modes: tuple[str, ...] | None = None, progress=None) -> dict:
    """The large model alone, the small one alone and every solver mode the pair allows (`modes`:
    only these), on the same prompts in one run (see the module's docstring)."""
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
    if questions:
        prompts = [large.tokenizer.encode(q.prompt) for q in questions]
        new_tokens = max(len(large.tokenizer.encode(q.answer)) for q in questions) + 2   # room for the end
    else:
        prompts = [np.random.default_rng(7 + i).integers(0, min(large.vocab_size, 1000), cfg.prompt_len).tolist()
                   for i in range(cfg.prompts)]
        new_tokens = cfg.new_tokens
    per_answer = bool(questions)
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
        answers = _answer_all(model, mode, prompts, new_tokens)
        gens = answers.gens
        row = answers.row(per_answer)
        if questions:
            row["accuracy"] = sum(g.text.strip() == q.answer for g, q in zip(gens, questions)) / len(questions)
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
            par, seq = (_answer_all(model, spec.build(large, small, replace(options, parallel=p)), prompts,
                                    new_tokens).row(per_answer) for p in (True, False))
            both = report["large"]["p50_ms"] + report["small"]["p50_ms"]
            row.update(overhead=row["ms_per_token"] / report["large"]["ms_per_token"],
                       cost_vs_both_alone=row["p50_ms"] / both, parallel_p50_ms=par["p50_ms"],
                       sequential_p50_ms=seq["p50_ms"], overlap=1 - par["p50_ms"] / seq["p50_ms"])
        report[name] = row
    out = {"large": str(large_dir), "small": str(small_dir) if small_dir else None,
           "bridges": str(bridges_dir) if bridges_dir else None,
           "config": dict(asdict(cfg), new_tokens=new_tokens, prompts=len(prompts),
                          latency="per answer" if per_answer else "per token"),
           "modes": report}
    if questions:
        out.update(questions=len(questions), baseline=baseline(questions), knowledge=_knowledge(large, small, questions))
    return out


def _knowledge(large, small, questions: list[Question]) -> dict[str, float]:
    """What each model knows alone: the small one the facts, the large one the questions given the facts."""
    out = {}
    facts = {p: a for q in questions for p, a in q.facts.items()}
    if small is not None and facts:
        out["small_facts"] = _accuracy(small, facts, 2, whole=False)
    digits = {q.digit_prompt: q.answer for q in questions if q.digit_prompt}
    if digits:
        out["large_given_facts"] = _accuracy(large, digits, 4)
    return out


def print_solver_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x, spec):
        return "" if x is None else format(x, spec)

    cfg = report["config"]
    per_answer = cfg.get("latency") == "per answer"
    what = (f"{report['questions']} questions, one at a time" if per_answer
            else f"batch 1, greedy, {cfg['new_tokens']} new tokens")
    t = Table(title=f"solver modes: large {report['large']}, small {report['small'] or '-'} ({what})")
    cols = (["mode"] + (["accuracy"] if per_answer else []) + ["tok/s", "ms/answer P50/P95" if per_answer else
            "ms/tok P50/P95", "speedup", "model", "model(v)", "accept", "k", "tok/rnd", "c", "v", "escal",
            "overhead", "overlap", "=large"])
    for col in cols:
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for name, m in report["modes"].items():
        t.add_row(name, *([f(m.get("accuracy"), ".1%")] if per_answer else []), f(m["tok_s"], ".1f"),
                  f"{m['p50_ms']:.1f}/{m['p95_ms']:.1f}", f(m.get("speedup"), ".2f"),
                  f(m.get("predicted_speedup"), ".2f"), f(m.get("predicted_speedup_with_verify_cost"), ".2f"),
                  f(m.get("acceptance_rate"), ".2f"), f(m.get("mean_k"), ".1f"), f(m.get("tokens_per_round"), ".2f"),
                  f(m.get("cost_ratio"), ".2f"), f(m.get("verify_cost"), ".2f"), f(m.get("escalation_rate"), ".2f"),
                  f(m.get("overhead"), ".2f"), f(m.get("overlap"), ".2f"),
                  {None: "", True: "yes", False: "no"}[m.get("tokens_match_large")])
    Console(width=max(180, Console().width)).print(t)
    if per_answer:
        k = report.get("knowledge", {})
        print(f"baseline (the most common answer): {report['baseline']:.1%}"
              + "".join(f"; {name.replace('_', ' ')} {v:.1%}" for name, v in k.items()))
    print("speedup: measured P50 latency of large alone over the mode's, this run; model: (1 - a^(k+1)) / "
          "((1 - a)(k c + 1)) from the measured acceptance a, drafts per round k and draft cost c (a draft step "
          "over a large decode step); model(v): the same with the verify call's measured cost v instead of 1; "
          "overhead: fused ms/token over large alone's; overlap: 1 - fused with the small model on its "
          "own thread over fused with it run first")

