"""Cascade mode, the pair check and `dualbrain solve`.

Cascade references are plain greedy loops over one model alone (no engine): the small model alone
when no window escalates, the large model alone when every window does.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dualbrain.cli import main
from dualbrain.errors import DualbrainError
from dualbrain.runtime.sampling import SamplingParams
from dualbrain.runtime.solver.cascade import CascadeDecode, confidence
from test_speculative import plain_greedy, prompts, run


@pytest.fixture(scope="module")
def dirs(artifacts):
    large = artifacts.export(artifacts.checkpoint("moe", "causal", attention="published"))
    small = artifacts.export(artifacts.checkpoint("dense", "conditional", seed=5))
    return large, small, artifacts.export(artifacts.checkpoint("moe"))


@pytest.fixture(scope="module")
def pair(dirs):
    from dualbrain.runtime.model import Model

    return Model.load(dirs[0]), Model.load(dirs[1])


def test_confidence_is_the_lowest_top1_probability():
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(50) * 3 for _ in range(4)]
    top1 = [np.exp(x).max() / np.exp(x).sum() for x in logits]
    assert confidence(logits) == pytest.approx(min(top1), rel=1e-12)


@pytest.mark.parametrize("max_batch", [1, 3])
def test_cascade_never_escalating_is_the_small_model_alone(pair, max_batch):
    large, small = pair
    ps = prompts(large, seed=3)
    gens = run(large, CascadeDecode(small, window=4, threshold=0.0), ps, max_batch=max_batch)
    assert [g.new_ids for g in gens] == [plain_greedy(small, p) for p in ps]
    assert all(g.escalations == 0 and g.rounds > 0 for g in gens)


@pytest.mark.parametrize("max_batch", [1, 3])
def test_cascade_always_escalating_is_the_large_model_alone(pair, max_batch):
    large, small = pair
    ps = prompts(large, seed=3)
    gens = run(large, CascadeDecode(small, window=3, threshold=1.01), ps, max_batch=max_batch)
    assert [g.new_ids for g in gens] == [plain_greedy(large, p) for p in ps]
    assert all(g.escalations == g.rounds > 0 for g in gens)


def test_cascade_escalates_only_unsure_windows(pair):
    """A threshold at the median of the small model's window confidences: some windows escalate and
    some do not."""
    large, small = pair
    ps = prompts(large, (9, 33, 5), seed=0)
    params = SamplingParams(greedy=True, max_new_tokens=24)
    mode = CascadeDecode(small, window=2, threshold=0.0)
    seen = []
    real = mode.drafter.propose

    def spy(engine, plans):
        props = real(engine, plans)
        seen.extend(confidence(x.logits) for x in props.values())
        return props
    mode.drafter.propose = spy
    run(large, mode, ps, params=params)
    gens = run(large, CascadeDecode(small, window=2, threshold=float(np.median(seen))), ps, params=params)
    escalations, rounds = sum(g.escalations for g in gens), sum(g.rounds for g in gens)
    assert 0 < escalations < rounds, (escalations, rounds, len(seen))


def test_pair_check_compares_tokenizer_content(dirs, tmp_path):
    from dualbrain.runtime.solver.pair import check_pair

    large, small, _ = dirs
    check_pair(large, small)                      # same tokenizer: fine
    other = tmp_path / "other"
    shutil.copytree(small, other)
    # a different chat template (Qwen3.6 vs 3.5) over the same vocabulary still pairs
    cfg = other / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    tpl = other / "chat_template.jinja"
    if tpl.is_file():
        tpl.write_text(tpl.read_text() + "{# another template #}")
    else:
        assert data.get("chat_template")
        data["chat_template"] += "{# another template #}"
        cfg.write_text(json.dumps(data))
    _refresh_sizes(other)
    check_pair(large, other)
    # two vocabulary entries swapped (same file size): refused
    tj = other / "tokenizer.json"
    tok = json.loads(tj.read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tj.write_text(json.dumps(tok, ensure_ascii=False))
    _refresh_sizes(other)
    with pytest.raises(DualbrainError, match="tokenizers differ \\(vocabulary"):
        check_pair(large, other)
    res = CliRunner().invoke(main, ["solve", "--large", str(large), "--small", str(other), "--mode", "speculative",
                                    "--ids", "1,2,3"])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "tokenizers differ" in lines[0], res.output


def _refresh_sizes(export_dir):
    """Record edited files' new sizes in the manifest, as an export of them would."""
    man = json.loads((export_dir / "manifest.json").read_text())
    for rel, info in man["files"].items():
        if isinstance(info, dict) and "size" in info:
            info["size"] = (export_dir / rel).stat().st_size
            info.pop("sha256", None)
    (export_dir / "manifest.json").write_text(json.dumps(man))


def _solve(*args):
    res = CliRunner().invoke(main, ["solve", *map(str, args)])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _generate(export, ids, n):
    res = CliRunner().invoke(main, ["generate", str(export), "--ids", ids, "--greedy", "--max-new-tokens", str(n),
                                    "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)["new_ids"]


def test_solve_cli_modes_and_json(dirs):
    large, small, mtp_large = dirs
    ids, n = "11,22,33,44,55", 20
    ref = _generate(large, ids, n)
    for mode in ("speculative", "cascade"):
        extra = ["--threshold", "2"] if mode == "cascade" else []
        out = _solve("--large", large, "--small", small, "--mode", mode, "--ids", ids, "--greedy",
                     "--max-new-tokens", n, "--json", *extra)
        assert out["new_ids"] == ref, mode
        for key in ("new_ids", "text", "finish_reason", "prompt_tokens", "prefill_tokens_per_s",
                    "decode_tokens_per_s", "drafted", "accepted", "acceptance_rate", "escalations"):
            assert key in out, key
    assert out["escalations"] == out["rounds"] > 0
    out = _solve("--large", mtp_large, "--mode", "mtp", "--ids", ids, "--greedy", "--max-new-tokens", n,
                 "--draft-tokens", 2, "--json")
    assert out["new_ids"] == _generate(mtp_large, ids, n) and out["drafted"] > 0
    assert out["acceptance_rate"] == pytest.approx(out["accepted"] / out["drafted"])
    # cascade that never escalates answers as the small model alone
    out = _solve("--large", large, "--small", small, "--mode", "cascade", "--threshold", 0, "--ids", ids,
                 "--greedy", "--max-new-tokens", n, "--json")
    assert out["new_ids"] == _generate(small, ids, n) and out["escalations"] == 0
    # a prompt through the large model's chat template, sampled
    out = _solve("--large", large, "--small", small, "--mode", "speculative", "--prompt", "Hi there", "--seed", 1,
                 "--max-new-tokens", 8, "--json")
    assert 1 <= len(out["new_ids"]) <= 8


@pytest.mark.parametrize("args, needle", [
    (["--mode", "speculative", "--ids", "1,2"], "needs the small model"),
    (["--mode", "speculative", "--small", "{small}", "--ids", "1,2", "--prompt", "x"], "exactly one of"),
    (["--mode", "speculative", "--small", "{small}", "--ids", "1,2", "--draft-tokens", "0"], "at least 1"),
    (["--mode", "mtp", "--small", "{small}", "--ids", "1,2"], "drop --small"),
    (["--mode", "mtp", "--ids", "1,2", "--large", "{small_causal}"], "no mtp head"),
    (["--mode", "speculative", "--small", "{small}", "--ids", "1,999999"], "outside the vocabulary"),
])
def test_solve_user_errors(dirs, artifacts, args, needle):
    large, small, _ = dirs
    small_causal = artifacts.export(artifacts.checkpoint("moe", "causal"))
    args = [a.format(small=small, small_causal=small_causal) for a in args]
    if "--large" not in args:
        args = ["--large", str(large), *args]
    res = CliRunner().invoke(main, ["solve", *args])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0].lower(), res.output
