"""`dualbrain demo`'s default: the trained tiny pair answering held-out questions in every mode (then the
CLI prints the solver table, runtime/solver/bench.py). Runtime only (numpy + ONNX Runtime)."""
from __future__ import annotations

from typing import Callable

from dualbrain.recipes.pair import PairDir

COLUMNS = ("small", "large", "fused", "speculative", "mtp", "cascade")


def answers_by_mode(pair: PairDir, prompts: list[str], draft_tokens: int = 4) -> dict[str, list[str]]:
    """Each mode's greedy answers to `prompts` (all prompts in one batch per mode)."""
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams
    from dualbrain.runtime.solver import MODES, SolverOptions
    from dualbrain.runtime.solver.pair import check_pair

    check_pair(pair.large, pair.small)
    large, small = Model.load(pair.large), Model.load(pair.small)
    ids = [large.tokenizer.encode(p) for p in prompts]
    params = SamplingParams(greedy=True, max_new_tokens=4)
    options = SolverOptions(draft_tokens=draft_tokens, bridges=str(pair.bridges))
    out = {}
    for name in COLUMNS:
        if name in MODES:
            gens = generate(large, ids, params, mode=MODES[name].build(large, small, options))
        else:
            gens = generate(large if name == "large" else small, ids, params)
        out[name] = [g.text.strip() for g in gens]
    return out


def show_answers(pair: PairDir, questions, echo: Callable[[str], None]) -> None:
    """A table of `questions` (runtime.solver.bench.Question) with every mode's answer."""
    from rich.console import Console
    from rich.table import Table

    answers = answers_by_mode(pair, [q.prompt for q in questions])
    t = Table(title="held-out questions (names the bridges never saw; the small model knows their digits)")
    for col in ("question", "digits", "answer") + COLUMNS:
        t.add_column(col, justify="left" if col in ("question", "digits") else "right")
    for i, q in enumerate(questions):
        t.add_row(q.prompt, ", ".join(f"{k}={v}" for k, v in q.facts.items()), q.answer,
                  *(("[green]" if a[i] == q.answer else "[red]") + (a[i] or "-") for a in answers.values()))
    Console(width=max(140, Console().width)).print(t)
