"""`dualbrain bench` on a tiny export: every engine that runs reports its figures, and the peers'
greedy tokens are checked against ours before their speed is shown. (Speeds themselves are never
asserted: the numbers live in README / RESULTS.md with the command that produced them.)"""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from dualbrain.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def moe(artifacts):
    ckpt = artifacts.checkpoint("moe", "conditional")
    return ckpt, artifacts.export(ckpt)


def test_bench_with_peers(moe, tmp_path):
    ckpt, out = moe
    report_file = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", str(out), "--checkpoint", str(ckpt), "--prefill", "8,33",
                                    "--batch", "1,2", "--new-tokens", "5", "--runs", "1", "-o", str(report_file),
                                    "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(report_file.read_text())
    assert json.loads(res.output[res.output.index("{"):]) == report
    engines = {e["name"]: e for e in report["engines"]}
    want = {"dualbrain", "transformers"} | ({"onnxruntime-genai"} if importlib.util.find_spec("onnxruntime_genai")
                                            else set())
    assert set(engines) == want and all(e["ok"] for e in engines.values()), engines
    for name, e in engines.items():
        assert set(e["prefill"]) == {"8", "33"} and all(v > 0 for v in e["prefill"].values())
        assert set(e["decode"]) == {"1", "2"}
        assert all(d["tok_s"] > 0 and 0 < d["p50_ms"] <= d["p95_ms"] for d in e["decode"].values())
        assert e["peak_rss_mib"] > 0 and len(e["greedy_ids"]) == 5
        assert e["tokens_match"] is (None if name == "dualbrain" else True)
    assert report["roofline_decode_tok_s"] > 0 and report["size_bytes"] > 0
    roof = report["roofline_decode_tok_s_by_batch"]
    assert set(roof) == {"1", "2"} and roof["1"] == report["roofline_decode_tok_s"]
    # two tokens share every weight but the experts, so a step of two reads less than twice the bytes
    steps = report["precisions"][0]["decode_bytes_per_step"]
    assert steps["1"] < steps["2"] < 2 * steps["1"] and roof["2"] > roof["1"]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_bytes_counts_the_weights_one_step_reads(moe, batch):
    """Independent count from the checkpoint's own safetensors header: every language-model weight,
    less the embedding table but one row, with only the experts a step touches: for `batch` tokens
    routed at random, the mean number of distinct experts over simulated routings."""
    from dualbrain.bench import decode_bytes
    from dualbrain.exporter.checkpoint import read_header
    from dualbrain.runtime.spec import ModelSpec

    ckpt, out = moe
    spec = ModelSpec.from_dir(ckpt)
    rng = np.random.default_rng(0)
    touched = np.mean([len({int(e) for _ in range(batch)
                            for e in rng.choice(spec.num_experts, spec.num_experts_per_tok, replace=False)})
                       for _ in range(20000)])
    total = 0.0
    for f in ckpt.glob("*.safetensors"):
        for name, info in read_header(f).items():
            if not (name.startswith(spec.weight_prefix) or name == "lm_head.weight"):
                continue
            n = math.prod(info["shape"])
            if name.endswith("embed_tokens.weight"):
                n = spec.hidden_size
            elif ".mlp.experts." in name:
                n = n * touched / spec.num_experts
            total += n
    assert decode_bytes(out, batch) == pytest.approx(total * 4, rel=5e-3)
    if batch == 1:
        assert touched == spec.num_experts_per_tok


def _engine(name, decode, prefill, p95=None):
    from dualbrain.bench import EngineResult

    return EngineResult(name, True, result={"prefill": {64: prefill}, "decode": {1: {
        "tok_s": decode, "p50_ms": 1000 / decode, "p95_ms": p95}}})


def test_rounds_give_medians_and_per_round_ratios():
    """Three rounds in which the machine slowed down in the middle: each figure is the median over
    rounds, and the ratio to llama.cpp the median of each round's own ratio, not the ratio of medians."""
    from dualbrain.bench import EngineResult, merge_rounds, versus_llama

    ours = [_engine("dualbrain", d, p, 3.0) for d, p in ((10, 300), (12, 100), (30, 330))]
    theirs = [_engine("llama.cpp f32.gguf", d, p) for d, p in ((20, 200), (10, 90), (30, 300))]
    merged = merge_rounds(ours)
    assert merged.ok and merged.result["decode"][1]["tok_s"] == 12 and merged.result["prefill"][64] == 300
    assert merged.result["decode"][1]["p50_ms"] == pytest.approx(1000 / 12)
    assert [r["decode"][1] for r in merged.result["rounds"]] == [10, 12, 30]
    assert merge_rounds(theirs).result["decode"][1]["p95_ms"] is None       # llama-bench gives none
    (v,) = versus_llama([ours], [theirs])
    assert v["engine"] == "dualbrain" and v["llama"] == "llama.cpp f32.gguf" and v["rounds"] == 3
    assert v["decode_b1"] == pytest.approx(np.median([10 / 20, 12 / 10, 30 / 30]))     # 1.0; medians' ratio: 0.6
    assert v["prefill"][64] == pytest.approx(np.median([300 / 200, 100 / 90, 330 / 300]))
    failed = EngineResult("dualbrain", False, "failed: out of memory")
    assert merge_rounds([ours[0], failed]) is failed
    assert versus_llama([[ours[0], failed]], [theirs[:2]]) == []              # a failed engine has no ratio
    assert merge_rounds(ours[:1]) is ours[0]                                # one round: as measured


def test_the_roofline_probe_sizes_its_matrix_past_the_last_level_cache(tmp_path):
    """The GEMV that sets the roofline must stream from memory: its matrix is at least 1 GiB and four times the
    largest cache sysfs lists (a 256 MiB matrix sat in part in a 300 MiB L3 and read 27-47 GB/s, 1 GiB 25-27)."""
    from dualbrain.bench import last_level_cache_bytes, roofline_matrix_bytes

    assert roofline_matrix_bytes(300 * 2 ** 20) == 1200 * 2 ** 20 and roofline_matrix_bytes(0) == 2 ** 30

    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "300M"), ("index1", "32K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 300 * 2 ** 20
    (tmp_path / "index3" / "size").write_text("unknown\n")
    assert last_level_cache_bytes(tmp_path) == 2048 * 2 ** 10                  # an unreadable size is skipped
    assert last_level_cache_bytes(tmp_path / "absent") == 0


def test_run_order_puts_each_export_beside_its_gguf():
    from dualbrain.bench import run_order

    # [dualbrain, transformers, ort-genai, int8, int4, f32.gguf, q8_0.gguf, q4_0.gguf]
    assert run_order(3, 2, 3) == [0, 5, 3, 6, 4, 7, 1, 2]
    assert run_order(1, 3, 1) == [0, 4, 1, 2, 3]
    assert run_order(1, 0, 0) == [0]
    assert sorted(run_order(2, 1, 4)) == list(range(7))


def test_bench_rounds(moe, tmp_path):
    _, out = moe
    res = CliRunner().invoke(main, ["bench", str(out), "--no-peers", "--prefill", "16", "--batch", "1",
                                    "--new-tokens", "4", "--runs", "1", "--rounds", "2", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output[res.output.index("{"):])
    (eng,) = rep["engines"]
    rates = [r["decode"]["1"] for r in eng["rounds"]]
    assert len(rates) == 2 and all(x > 0 for x in rates) and rep["config"]["rounds"] == 2
    assert eng["decode"]["1"]["tok_s"] == pytest.approx(np.median(rates))
    assert len(rep["gemv_bytes_per_s_by_round"]) == 2
    assert rep["gemv_bytes_per_s"] == pytest.approx(np.median(rep["gemv_bytes_per_s_by_round"]))
    assert rep["versus_llama"] == []


@pytest.mark.parametrize("args, message", [
    ([], "give the export to benchmark"),
    (["{out}", "--prefill", "8,x"], "--prefill must be comma-separated integers"),
    (["{out}", "--batch", "0"], "--batch must list positive integers"),
    (["{out}", "--checkpoint", "{tmp}"], "no config.json there"),
])
def test_bench_bad_arguments(moe, tmp_path, args, message):
    _, out = moe
    res = CliRunner().invoke(main, ["bench", *[a.format(out=out, tmp=tmp_path) for a in args]])
    assert res.exit_code == 2 and message in res.output, res.output


def test_bench_solver_modes(artifacts, tmp_path):
    """`bench --solver`: every mode on the same prompts, exact modes flagged token-identical to the large
    model alone, and the cost model's prediction computed from the reported a, k, c (and v)."""
    from dualbrain.runtime.solver.bench import predicted_speedup

    large = artifacts.export(artifacts.checkpoint("moe"))
    small = artifacts.export(artifacts.checkpoint("dense", "conditional", seed=5))
    res = CliRunner().invoke(main, ["bench", "--solver", "--large", str(large), "--small", str(small),
                                    "--new-tokens", "12", "--prompts", "2", "--draft-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    modes = json.loads(res.output[res.output.index("{"):])["modes"]
    assert list(modes) == ["large", "small", "speculative", "mtp", "cascade"]
    for name, m in modes.items():
        assert m["tok_s"] > 0 and 0 < m["p50_ms"] <= m["p95_ms"] and m["new_tokens"] > 0
        if name != "large":
            assert m["speedup"] == pytest.approx(modes["large"]["p50_ms"] / m["p50_ms"])
    for name in ("speculative", "mtp"):
        m = modes[name]
        assert m["tokens_match_large"] is True
        assert 0 <= m["acceptance_rate"] <= 1 and 1 <= m["mean_k"] <= 3 and m["cost_ratio"] > 0 and m["verify_cost"] > 0
        a, k, c = m["acceptance_rate"], m["mean_k"], m["cost_ratio"]
        assert m["predicted_speedup"] == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (k * c + 1)))
        assert m["predicted_speedup_with_verify_cost"] == pytest.approx(predicted_speedup(a, k, c, m["verify_cost"]))
    assert 0 <= modes["cascade"]["escalation_rate"] <= 1
    assert predicted_speedup(1.0, 3, 0.0) == 4.0 and predicted_speedup(0.0, 3, 0.5) == pytest.approx(1 / 2.5)
