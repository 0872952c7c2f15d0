"""Fused mode: the pair with bridges, against the composition run by transformers' own modeling code.

The pair: a tiny MoE large model with the published attention geometry (16 q / 2 KV heads of 256)
and a tiny dense small model of another width (48 vs 64) and head count; two bridges with 3 heads of
8 (other head counts again), random weights and open gates. The reference (`exporter.align.Composition`)
runs both transformers models over whole sequences with the bridges hooked in; the runtime runs
chunks with cached state, batched, through a rollback.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dualbrain.errors import DualbrainError
from dualbrain.runtime.bridges import Link

torch = pytest.importorskip("torch")


def _rel(got, ref):
    return float(np.abs(np.asarray(got) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def _bridges(cfg, gate: float, seed: int):
    from dualbrain.exporter.blocks.bridge import Bridge

    out = []
    for i in range(len(cfg.links)):
        b = Bridge(cfg.shape, seed=seed + i)
        g = torch.Generator().manual_seed(100 + seed + i)
        with torch.no_grad():
            b.gate.fill_(gate)
            b.norm_q.copy_(torch.randn(b.norm_q.shape, generator=g) * 0.3)
            b.norm_kv.copy_(torch.randn(b.norm_kv.shape, generator=g) * 0.3)
        out.append(b)
    return out


@pytest.fixture(scope="module")
def setup(artifacts, tmp_path_factory):
    from dualbrain.exporter.align import new_config, write_bridges
    from dualbrain.exporter.export import export_bridges
    from dualbrain.exporter.tiny import make_tiny
    from dualbrain.runtime.model import Model

    root = tmp_path_factory.mktemp("fused")
    large_ckpt = artifacts.checkpoint("moe", "causal", attention="published")
    small_ckpt = make_tiny(root / "small", family="dense", layout="causal", hidden_size=48, seed=7)
    large, small = Model.load(artifacts.export(large_ckpt)), Model.load(artifacts.export(small_ckpt))
    assert small.spec.hidden_size != large.spec.hidden_size and small.spec.num_heads != large.spec.num_heads
    cfg = new_config(small_ckpt, large_ckpt, (Link(1, 0), Link(3, 2)), heads=3, head_dim=8)
    made = {}
    for name, gate in (("open", 0.8), ("closed", 0.0)):
        bridges = _bridges(cfg, gate, seed=1)
        write_bridges(root / name, cfg, bridges)
        made[name] = (export_bridges(root / name, root / f"{name}.onnx"), bridges)
    return dict(large=large, small=small, large_ckpt=large_ckpt, small_ckpt=small_ckpt, cfg=cfg, made=made,
                root=root)


def _pair(s, which="open", parallel=True):
    from dualbrain.runtime.solver.fused import Bridges, FusedPair

    return FusedPair(s["large"], s["small"], Bridges.load(s["made"][which][0], s["large"]), parallel=parallel)


@pytest.fixture(scope="module")
def reference(setup):
    from dualbrain.exporter.align import Composition

    comp = Composition.load(setup["small_ckpt"], setup["large_ckpt"], setup["cfg"], setup["made"]["open"][1])

    def logits(seq):
        with torch.no_grad():
            return comp.logits(torch.as_tensor(np.asarray(seq)[None], dtype=torch.long))[0].numpy()
    return logits


@pytest.mark.parametrize("parallel", [True, False])
def test_fused_logits_match_the_composition(setup, reference, parallel):
    """Prefill, decode and a 2-token chunk on batch 2; then a rollback that keeps 0 and 2 of 3 fed
    tokens in the two rows, and one more step: every logit within 1e-5 of the reference."""
    pair = _pair(setup, parallel=parallel)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, pair.large.vocab_size, (2, 9))
    st = pair.new_state(2, 32)
    got = np.concatenate([pair.step(seqs[:, :6], st, logits_to_keep=6), pair.step(seqs[:, 6:7], st),
                          pair.step(seqs[:, 7:9], st, logits_to_keep=2)], axis=1)
    for row in range(2):
        ref = reference(seqs[row])
        assert ref.std() > 1.0
        assert _rel(got[row], ref) <= 1e-5
    st.mark()
    junk = rng.integers(0, pair.large.vocab_size, (2, 3))
    pair.step(junk, st, logits_to_keep=3)
    st.rollback(0, 0)
    st.rollback(1, 2)
    st.unmark()
    nxt = rng.integers(0, pair.large.vocab_size, (2, 1))
    got = pair.step(nxt, st)[:, -1]
    for row, kept in ((0, []), (1, list(junk[1, :2]))):
        ref = reference(list(seqs[row]) + kept + [nxt[row, 0]])[-1]
        assert _rel(got[row], ref) <= 1e-5, row


def test_open_gates_change_the_large_model(setup):
    pair = _pair(setup)
    ids = np.arange(5, 12)[None]
    fused = pair.step(ids, pair.new_state(1, 16), logits_to_keep=7)
    alone = pair.large.step(ids, pair.large.new_state(1, 16), logits_to_keep=7).logits
    assert _rel(fused, alone) > 1e-2


def test_closed_gates_leave_the_large_model_as_it_was(setup):
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.sampling import SamplingParams
    from dualbrain.runtime.solver.fused import FusedDecode
    from test_speculative import plain_greedy, prompts

    pair = _pair(setup, "closed")
    large = pair.large
    ids = np.random.default_rng(3).integers(0, large.vocab_size, (2, 7))
    st = pair.new_state(2, 16)
    blocks, linked = large.new_state(2, 16), large.new_state(2, 16)
    for chunk in (ids[:, :5], ids[:, 5:]):
        fused = pair.step(chunk, st, logits_to_keep=chunk.shape[1])
        per_block = large.step(chunk, blocks, logits_to_keep=chunk.shape[1], linked=False).logits
        whole = large.step(chunk, linked, logits_to_keep=chunk.shape[1]).logits
        assert np.array_equal(fused, per_block)                   # bitwise
        assert np.abs(fused - whole).max() <= 1e-6 * max(1.0, np.abs(whole).max())
    ps = prompts(large, (4, 11, 2), seed=6)
    engine = Engine(large, max_batch=2, prefill_chunk=5, mode=FusedDecode(pair))
    reqs = [engine.submit(p, SamplingParams(greedy=True, max_new_tokens=24)) for p in ps]
    assert [r.result().new_ids for r in reqs] == [plain_greedy(large, p, 24) for p in ps]


def test_fused_engine_batches_requests_as_each_alone(setup):
    """Three requests through two rows (continuous batching, chunked prefill) give each request's
    tokens from a plain greedy loop over the pair alone."""
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.sampling import SamplingParams
    from dualbrain.runtime.solver.fused import FusedDecode
    from test_speculative import prompts

    pair = _pair(setup)

    def alone(p, n=20):
        st = pair.new_state(1, len(p) + n + 1)
        logits, out = pair.step(np.asarray([p]), st)[:, -1], []
        for _ in range(n):
            out.append(int(np.argmax(logits[0])))
            if out[-1] in pair.large.eos_ids:
                break
            logits = pair.step(np.asarray([[out[-1]]]), st)[:, -1]
        return out

    ps = prompts(pair.large, (4, 11, 2), seed=5)
    engine = Engine(pair.large, max_batch=2, prefill_chunk=5, mode=FusedDecode(pair))
    reqs = [engine.submit(p, SamplingParams(greedy=True, max_new_tokens=20)) for p in ps]
    assert [r.result().new_ids for r in reqs] == [alone(p) for p in ps]


def test_bridges_for_another_pair_are_refused(setup, artifacts):
    from dualbrain.cli import main
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.solver.fused import Bridges, FusedPair

    other_dir = artifacts.export(artifacts.checkpoint("moe", "causal"))       # tiny attention: another model
    other = Model.load(other_dir)
    with pytest.raises(DualbrainError, match="made for another large model"):
        FusedPair(other, setup["small"], Bridges.load(setup["made"]["open"][0], other))
    res = CliRunner().invoke(main, ["solve", "--large", str(other_dir), "--small", str(setup["small"].dir),
                                    "--mode", "fused", "--bridges", str(setup["made"]["open"][0]), "--ids", "1,2"])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "made for another large model" in lines[0], res.output
    # the right pair through the CLI, with the JSON of the other modes
    res = CliRunner().invoke(main, ["solve", "--large", str(setup["large"].dir), "--small", str(setup["small"].dir),
                                    "--mode", "fused", "--bridges", str(setup["made"]["open"][0]), "--ids", "1,2,3",
                                    "--greedy", "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["mode"] == "fused" and len(out["new_ids"]) == 6 and "acceptance_rate" in out


def test_align_trains_resumes_and_exports(setup, tmp_path):
    """Loss goes down on a small repeated data set; Ctrl-C keeps the last checkpoint and the same
    command resumes there; the result exports and loads."""
    from dualbrain.exporter.align import AlignOptions, align
    from dualbrain.exporter.export import export_bridges
    from dualbrain.runtime.bridges import load_config
    from dualbrain.runtime.solver.fused import Bridges, FusedPair

    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"ids": rng.integers(0, 1000, 16).tolist()}) + "\n" for _ in range(2))
                    + json.dumps({"text": "Hello there, bridges."}) + "\n")
    out = tmp_path / "br"
    opts = AlignOptions(steps=10, batch=2, seq_len=16, lr=3e-2, save_every=3)
    kw = dict(links=(Link(1, 0), Link(3, 2)), data=data, heads=2, head_dim=8, opts=opts)

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        align(setup["small_ckpt"], setup["large_ckpt"], out, on_step=interrupt, **kw)
    assert not out.exists() and (tmp_path / "br.partial" / "align-state.pt").is_file()
    seen = []
    losses = align(setup["small_ckpt"], setup["large_ckpt"], out, on_step=lambda s, _: seen.append(s), **kw)
    assert seen == list(range(4, 11))                  # resumed after the checkpoint at step 3
    assert len(losses) == 7 and losses[-1] < losses[0]
    cfg = load_config(out)
    assert cfg.trained_steps == 10 and cfg.large["tokenizer"] == cfg.small["tokenizer"]
    exported = export_bridges(out, tmp_path / "br.onnx")
    pair = FusedPair(setup["large"], setup["small"], Bridges.load(exported, setup["large"]))
    assert pair.step(np.arange(1, 5)[None], pair.new_state(1, 8)).shape == (1, 1, pair.large.vocab_size)
    # trained bridges (not their export) are refused with a pointer to the export
    with pytest.raises(DualbrainError, match="dualbrain export"):
        Bridges.load(out, setup["large"])


def test_align_cli_and_bad_input(setup, tmp_path):
    from dualbrain.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["align", str(setup["small_ckpt"]), str(setup["large_ckpt"]), *map(str, args)])
    res = run("-o", tmp_path / "x", "--layers", "9:0")
    assert res.exit_code == 2 and "outside the models" in res.output
    res = run("-o", tmp_path / "x", "--layers", "a-b")
    assert res.exit_code == 2 and "LARGE:SMALL" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ids": [1, 2, 99999]}\n')
    res = run("-o", tmp_path / "x", "--data", bad)
    assert res.exit_code == 2 and "line 1" in res.output and not (tmp_path / "x").exists()
    res = run("-o", tmp_path / "y", "--steps", 2, "--batch", 1, "--seq-len", 8, "--layers", "3:2")
    assert res.exit_code == 0, res.output
    assert "wrote bridges" in res.output and (tmp_path / "y" / "bridges.safetensors").is_file()
    cfg = json.loads((tmp_path / "y" / "bridges.json").read_text())
    assert cfg["links"] == [{"large_layer": 3, "small_layer": 2}] and cfg["trained_steps"] == 2
    # `dualbrain export BRIDGES -o OUT` exports bridges (one block per link)
    res = CliRunner().invoke(main, ["export", str(tmp_path / "y"), "-o", str(tmp_path / "y.onnx")])
    assert res.exit_code == 0, res.output
    exported = json.loads((tmp_path / "y.onnx" / "bridges.json").read_text())
    assert exported["dtype"] == "float32" and "bridge_000.onnx" in exported["files"]
    res = CliRunner().invoke(main, ["export", str(tmp_path / "y"), "-o", str(tmp_path / "z"), "--quant",
                                    "int4-weight-only", "--dtype", "float16"])
    assert res.exit_code == 2 and "do not apply to bridges" in res.output and not (tmp_path / "z").exists()


def test_bench_reports_fused_cost_and_overlap(setup):
    from dualbrain.runtime.solver.bench import SolverBenchConfig, bench_solver

    report = bench_solver(setup["large"].dir, setup["small"].dir, setup["made"]["open"][0], modes=("fused",),
                          cfg=SolverBenchConfig(new_tokens=6, prompts=2))
    modes = report["modes"]
    assert list(modes) == ["large", "small", "fused"]
    f = modes["fused"]
    both = modes["large"]["p50_ms"] + modes["small"]["p50_ms"]
    assert f["cost_vs_both_alone"] == pytest.approx(f["p50_ms"] / both)
    assert f["overhead"] == pytest.approx(f["p50_ms"] / modes["large"]["p50_ms"])
    assert f["overlap"] == pytest.approx(1 - f["parallel_p50_ms"] / f["sequential_p50_ms"])
