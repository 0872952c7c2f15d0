"""The tiny trained pair (recipes/pair): its task, the committed pair's figures, and the recipe end to end.

The committed pair is scored here on held-out questions with the thresholds of its issue: the small
model knows the names' digits, the large one adds digits and not names, the fused pair adds names it
never saw in bridge training, speculative and mtp answer exactly as the large model alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from click.testing import CliRunner


@pytest.fixture(scope="module")
def task():
    from dualbrain.recipes.pair.task import PairTask

    return PairTask()


def test_names_are_multi_token_and_tokenize_the_same_everywhere(task):
    names = task.names
    assert len(set(names)) == len(names) == 400
    assert not any(a != b and a.startswith(b) for a in names for b in names)
    lengths = [len(task.encode(n)) for n in names]
    assert min(lengths) >= 2 and np.mean(lengths) > 3
    q = task.held_out_questions(3)[0]
    # the prompt text tokenizes back to the ids the models were trained on
    assert task.encode(q.prompt) == task.encode(q.names[0]) + task.encode("+") + task.encode(q.names[1]) + \
        task.encode("=")
    assert sorted(set(task.digit.values())) == list(range(10))


def test_held_out_questions_never_reach_the_bridges(task):
    held = task.held_out_questions(500)
    assert len({q.prompt for q in held}) == 500
    assert {n for q in held for n in q.names} <= set(task.held_out_names)
    assert not set(task.held_out_names) & set(task.train_names)
    train = task.bridge_questions(2000)
    assert {n for q in train for n in q.names} <= set(task.train_names)
    for q in held[:50]:
        assert q.answer == str(task.digit[q.names[0]] + task.digit[q.names[1]])
        assert q.digit_prompt == f"{task.digit[q.names[0]]}+{task.digit[q.names[1]]}="


def test_training_batches_train_the_answer_only(task):
    from dualbrain.recipes.pair.task import batch

    rng = np.random.default_rng(0)
    ex = [task.question_example(task.held_out_questions(2)[1]), task.sum_example(rng)]
    ids, attn, loss = batch(ex, task.eos)
    for i, e in enumerate(ex):
        n = len(e.ids)
        assert attn[i, :n].all() and not attn[i, n:].any()
        # position t trains token t+1: exactly the answer tokens and the end
        trained = [int(ids[i, t + 1]) for t in range(ids.shape[1] - 1) if loss[i, t]]
        assert trained == list(e.ids[e.answer_from:]) and trained[-1] == task.eos


def test_align_data_prompt_completion(tmp_path, artifacts):
    from dualbrain.errors import DualbrainError
    from dualbrain.exporter.align import read_sequences

    ckpt = artifacts.checkpoint("dense")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "ab+cd=", "completion": "12"}) + "\n"
                 + json.dumps({"prompt": [5, 6, 7, 8, 9, 10, 11], "completion": [3]}) + "\n")
    s = read_sequences(f, ckpt, 1000, 64, 0, pad=999)
    assert s.ids.shape == (2, 8) and s.ids[1].tolist() == [5, 6, 7, 8, 9, 10, 11, 3]
    assert s.loss[1].tolist() == [0] * 6 + [1, 0] and s.attention[1].all()
    n0 = int(s.attention[0].sum())
    assert s.ids[0, n0:].tolist() == [999] * (8 - n0) and s.loss[0, n0 - 1:].sum() == 0
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(DualbrainError, match="mixes"):
        read_sequences(f, ckpt, 1000, 64, 0)


def test_committed_pair_is_the_recipes(task):
    """The committed pair records the recipe that made it (the defaults), and its exports and bridges
    are of its checkpoints."""
    from dualbrain.recipes.pair import TRAINED
    from dualbrain.recipes.pair.recipe import PairRecipe
    from dualbrain.runtime.bridges import load_config
    from dualbrain.runtime.manifest import load_manifest

    rec = json.loads((TRAINED.check().root / "recipe.json").read_text())
    assert rec["recipe"] == json.loads(json.dumps(asdict(PairRecipe())))
    assert sum(rec["seconds"].values()) < 20 * 60
    cfg = load_config(TRAINED.bridges)
    for side, export in (("large", TRAINED.large), ("small", TRAINED.small)):
        assert load_manifest(export).source["identity"] == getattr(cfg, side)
    questions = [json.loads(x) for x in TRAINED.questions.read_text().splitlines()]
    assert [q["prompt"] for q in questions] == [q.prompt for q in task.held_out_questions(len(questions))]


def test_committed_pair_answers(tmp_path):
    """`dualbrain bench --solver --json` on the committed pair (its first 150 held-out questions)."""
    from dualbrain.cli import main

    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", "--solver", "--limit", "150", "-o", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    m = r["modes"]
    assert list(m) == ["large", "small", "speculative", "mtp", "cascade", "fused"]
    for name, row in m.items():
        assert 0 <= row["accuracy"] <= 1 and row["p95_ms"] >= row["p50_ms"] > 0, name
    assert r["questions"] == 150 and r["config"]["latency"] == "per answer"
    assert r["knowledge"]["small_facts"] >= 0.99 and r["knowledge"]["large_given_facts"] >= 0.95
    assert m["fused"]["accuracy"] >= 0.40 and m["fused"]["overhead"] > 0
    assert m["large"]["accuracy"] <= r["baseline"] + 0.06      # 150 questions: a wider margin than 500's
    for name in ("speculative", "mtp"):
        assert m[name]["tokens_match_large"] and m[name]["accuracy"] == m["large"]["accuracy"]
        assert m[name]["speedup"] > 0
    assert m["mtp"]["acceptance_rate"] > 0.3
    assert 0 <= m["cascade"]["escalation_rate"] <= 1


def test_demo_defaults_to_the_committed_pair():
    from dualbrain.cli import main

    res = CliRunner().invoke(main, ["demo", "--show", "3", "--table-questions", "5"])
    assert res.exit_code == 0, res.output
    for word in ("held-out questions", "speculative", "cascade", "baseline", "small facts"):
        assert word in res.output


@pytest.mark.slow
def test_train_pair_end_to_end_then_bench_and_demo(tmp_path):
    """The recipe's whole path on a few steps and names: checkpoints in the published layout with a
    trained MTP head, bridges, exports, questions; then `bench --solver --pair` and `demo --pair`."""
    from dualbrain.cli import main
    from dualbrain.recipes.pair import PairDir
    from dualbrain.recipes.pair.recipe import PairRecipe, train_pair
    from dualbrain.recipes.pair.train import Schedule

    few = Schedule(steps=3, batch=8, warmup=1)
    recipe = PairRecipe(names=30, held_out=10, questions=20, small=few, large=few, mtp=few, bridges=few)
    rec = train_pair(tmp_path / "pair", recipe)
    pair = PairDir(tmp_path / "pair").check()
    assert set(rec.seconds) == {"small", "large", "mtp", "bridges", "export"}
    saved = json.loads((pair.root / "recipe.json").read_text())
    assert saved["recipe"]["names"] == 30 and saved["recipe"]["bridges"]["steps"] == 3
    man = json.loads((pair.large / "manifest.json").read_text())
    assert man["source"]["checkpoint"] == "../large" and any(b["kind"] == "mtp" for b in man["blocks"])
    assert len(pair.questions.read_text().splitlines()) == 20
    from safetensors import safe_open

    with safe_open(str(pair.large_checkpoint / "model.safetensors"), "pt") as f:
        mtp = [k for k in f.keys() if k.startswith("mtp.")]
        assert "mtp.fc.weight" in mtp and "mtp.layers.0.mlp.experts.gate_up_proj" in mtp
        assert all(f.get_tensor(k).isfinite().all() for k in mtp)
    assert not (tmp_path / "pair.partial").exists()

    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", "--solver", "--pair", str(pair.root), "--limit", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["questions"] == 4 and set(r["modes"]) == {"large", "small", "speculative", "mtp", "cascade", "fused"}
    res = CliRunner().invoke(main, ["demo", "--pair", str(pair.root), "--show", "2", "--table-questions", "3"])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.output and "fused" in res.output
    res = CliRunner().invoke(main, ["bench", "--solver", "--pair", str(tmp_path), "--limit", "4"])
    assert res.exit_code == 2 and "not a trained pair" in res.output
