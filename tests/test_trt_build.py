"""TensorRT-RTX: our custom nodes become plugin layers, every RTX recipe builds engines for a matching
tiny export, the engine manifest says what was built, and the tensorrt backend refuses engines from
another TensorRT or for another GPU before it needs one.

Runs without a GPU (TensorRT-RTX builds ahead of time); running engines needs one and is skipped.
The exports come from the session-wide `artifacts` cache with the same keys other tests use, so a
full run makes no extra export (alone, this file makes five: ~40 s each).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

trt = pytest.importorskip("tensorrt_rtx")

from dualbrain.errors import DualbrainError  # noqa: E402
from dualbrain.recipes.build import ENGINE_MANIFEST, build, inspect_plugins  # noqa: E402
from dualbrain.recipes.schema import RECIPE_DIR, bundled_recipes, load_recipe  # noqa: E402
from dualbrain.runtime.backends import load_backend  # noqa: E402
from dualbrain.runtime.manifest import load_manifest  # noqa: E402

# Checkpoint keys shared with test_errors / test_parity / test_runtime (fp32) and test_precision.
CKPT = {("dense", "float32"): dict(family="dense", layout="causal", tie=True),
        ("moe", "float32"): dict(family="moe", layout="conditional"),
        ("dense", "float16"): dict(family="dense", dtype="bfloat16"),
        ("moe", "float16"): dict(family="moe", dtype="bfloat16"),
        ("moe", "bfloat16"): dict(family="moe", dtype="bfloat16")}
RTX_RECIPES = [n for n in bundled_recipes() if load_recipe(n).flavour == "tensorrt-rtx"]
BUILDS = [(r, fam) for r in RTX_RECIPES for fam in ("dense", "moe")
          if (fam, load_recipe(r).precision) in CKPT]


@pytest.fixture(scope="module")
def export(artifacts):
    def get(family: str, dtype: str) -> Path:
        return artifacts.export(artifacts.checkpoint(**CKPT[(family, dtype)]), dtype=dtype)
    return get


@pytest.fixture(scope="module")
def engines(export, tmp_path_factory):
    """Engines per (recipe, family), built once."""
    root = tmp_path_factory.mktemp("engines")
    cache: dict = {}

    def get(recipe: str, family: str):
        if (recipe, family) not in cache:
            out = root / f"{recipe}-{family}"
            man = build(export(family, load_recipe(recipe).precision), recipe, out)
            cache[(recipe, family)] = (out, man)
        return cache[(recipe, family)]
    return get


def test_every_buildable_rtx_recipe_is_covered():
    precisions = {load_recipe(r).precision for r, _ in BUILDS}
    assert precisions == {"float32", "float16", "bfloat16"}
    assert {load_recipe(r).precision for r in RTX_RECIPES} - precisions == {"int4-weight-only"}


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_custom_nodes_become_plugin_v3_layers(export, family):
    out = export(family, "float32")
    layers = inspect_plugins(out)
    man = load_manifest(out)
    seen = set()
    for b in man.blocks:
        nodes = [n for n in onnx.load(str(out / b.file), load_external_data=False).graph.node
                 if n.domain == "dualbrain"]
        got = layers[b.name]
        assert [x["type"] for x in got] == ["PLUGIN_V3"] * len(nodes), b.name
        assert [(x["namespace"], x["plugin"]) for x in got] == [("dualbrain", n.op_type) for n in nodes]
        for x, n in zip(got, nodes):
            assert x["fields"] == {a.name: a.i for a in n.attribute}
        seen.update(x["plugin"] for x in got)
    want = {"CausalConv1d", "GatedDeltaRule"} | ({"MoEDispatch"} if family == "moe" else set())
    assert seen == want


@pytest.mark.parametrize("recipe, family", BUILDS)
def test_build_engines(engines, export, recipe, family):
    r = load_recipe(recipe)
    out, man = engines(recipe, family)
    src = export(family, r.precision)
    exp = load_manifest(src)
    assert not out.with_name(out.name + ".partial").exists()
    assert json.loads((out / ENGINE_MANIFEST).read_text()) == man
    assert man["format"] == "dualbrain-engines" and man["flavour"] == "tensorrt-rtx"
    assert man["tensorrt_version"] == trt.__version__
    assert man["compute_capabilities"] == list(r.compute_capabilities) and man["recipe"]["name"] == recipe
    assert man["export"]["dtype"] == r.precision and man["export"]["path"] == str(src.resolve())
    profiles = {p["name"]: p["dims"] for p in man["profiles"]}
    ctx = min(r.profile.max_context, exp.max_context)
    assert profiles["prefill"]["total"][2] == ctx and profiles["decode"]["seq"] == [1, 1, 2]
    assert (man["max_batch"], man["max_new_positions"], man["max_context"]) == (
        r.profile.max_batch, min(r.profile.max_prefill, ctx), ctx)
    assert [b["name"] for b in man["blocks"]] == [b.name for b in exp.blocks]
    for b, eb in zip(exp.blocks, man["blocks"]):
        data = (out / eb["engine"]).read_bytes()
        assert len(data) == eb["size"] > 0 and hashlib.sha256(data).hexdigest() == eb["sha256"]
        assert [t["name"] for t in eb["inputs"]] == [t.name for t in b.inputs]
        assert [t["shape"] for t in eb["outputs"]] == [list(t.shape) for t in b.outputs]
        assert len(eb["state"]) == len(b.state)
        kinds = {p["plugin"] for p in eb["plugins"]}
        if b.kind == "linear_attention":
            assert {"CausalConv1d", "GatedDeltaRule"} <= kinds
        if family == "moe" and b.layer is not None:
            assert "MoEDispatch" in kinds


# --- real contexts: every precision at the context its recipe serves --------------------------------
# One build per precision: the tiny geometry at the usual config's 32768 positions (the case),
# and the published attention geometry (16 q / 2 KV heads of 256, rotary 64) at the published 262144,
# which the recipes cap (32768, 65536 for int4). Dense causal checkpoints: the attention block is
# what grows with the context; the exports take ~20 s each.
REAL_CONTEXT = {
    "rtx4090-fp32": (dict(context=32768), "float32", None),
    "rtx4090-fp16": (dict(context=32768), "float16", None),
    "rtx5090-bf16": (dict(context=262144, attention="published"), "bfloat16", None),
    "rtx5090-int4": (dict(context=262144, attention="published"), "float16", "int4-weight-only"),
}


def test_real_context_covers_every_rtx_recipe():
    assert sorted(REAL_CONTEXT) == sorted(RTX_RECIPES)


@pytest.mark.parametrize("recipe", list(REAL_CONTEXT))
def test_build_at_real_context(artifacts, tmp_path, recipe):
    """The full-attention block is one ONNX `Attention` node, which TensorRT-RTX fuses in half
    precision: at 32768+ positions the unfused scores (batch x heads x new x total) did not build."""
    ckpt_args, dtype, quant = REAL_CONTEXT[recipe]
    r = load_recipe(recipe)
    src = artifacts.export(artifacts.checkpoint("dense", "causal", **ckpt_args), dtype=dtype, quant=quant)
    exp = load_manifest(src)
    assert exp.max_context == ckpt_args["context"]
    attention = next(b for b in exp.blocks if b.kind == "full_attention")
    ops = [n.op_type for n in onnx.load(str(src / attention.file), load_external_data=False).graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops
    man = build(src, recipe, tmp_path / "engines")
    ctx = min(r.profile.max_context, exp.max_context)
    assert (man["max_batch"], man["max_new_positions"], man["max_context"]) == (
        r.profile.max_batch, r.profile.max_prefill, ctx)
    assert [b["name"] for b in man["blocks"]] == [b.name for b in exp.blocks]
    assert man["build"]["seconds"] > 0 and man["build"]["worker_peak_rss_mib"] > 0
    print(f"{recipe} at {exp.max_context} (serves {ctx}): {man['build']['seconds']:.1f} s, "
          f"worker peak {man['build']['worker_peak_rss_mib']:.0f} MiB")


def _failing_export(tmp_path: Path) -> Path:
    """An export whose first block parses but cannot be built: a Reshape to [-1, 7] of a tensor whose
    size is not a multiple of 7 at the profile's shapes."""
    from onnx import TensorProto, helper, numpy_helper

    from dualbrain.exporter.tiny import text_config_dict
    from dualbrain.runtime.manifest import VERSION
    from dualbrain.runtime.spec import ModelSpec

    d = tmp_path / "export"
    d.mkdir()
    g = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
                           helper.make_node("Reshape", ["f", "shape"], ["hidden"])], "embed",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                          [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")])
    for f in ("embed.onnx", "layer_000.onnx", "head.onnx"):        # the build stops at the first
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), str(d / f))
    spec = ModelSpec.from_config(dict(text_config_dict(family="dense", num_layers=1), model_type="qwen3_5_text",
                                      layer_types=["linear_attention"]))
    ids = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    (d / "manifest.json").write_text(json.dumps({
        "format": "dualbrain-export", "version": VERSION, "model": spec.to_json(), "dtype": "float32",
        "opset": 23, "max_context": 64, "window": False,
        "files": {f.name: {"size": f.stat().st_size} for f in d.glob("*.onnx")},
        "blocks": [{"name": "embed", "kind": "embed", "file": "embed.onnx", "inputs": ids, "outputs": []},
                   {"name": "layer_000", "kind": "linear_attention", "layer": 0, "file": "layer_000.onnx",
                    "inputs": ids, "outputs": []},
                   {"name": "head", "kind": "head", "file": "head.onnx", "inputs": ids, "outputs": []}]}))
    return d


def test_failed_build_says_what_tensorrt_said(tmp_path):
    src = _failing_export(tmp_path)
    with pytest.raises(DualbrainError) as e:
        build(src, "rtx4090-fp32", tmp_path / "engines")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("TensorRT failed to build block embed: ")
    assert "Error Code 4" in msg and "reshaping failed" in msg and "--debug" in msg
    assert not (tmp_path / "engines").exists()


def test_debug_build_shows_tensorrts_log(tmp_path):
    from click.testing import CliRunner

    from dualbrain.cli import main

    src = _failing_export(tmp_path)
    res = CliRunner().invoke(main, ["--debug", "build", str(src), "--recipe", "rtx4090-fp32",
                                    "-o", str(tmp_path / "engines")])
    assert isinstance(res.exception, DualbrainError)
    lines = res.output.splitlines()
    assert any(ln.startswith("[TensorRT WARNING] ") and "input_ids" in ln for ln in lines)
    assert any(ln.startswith("[TensorRT ERROR] ") and "Error Code 4" in ln for ln in lines)
    assert sum(ln.startswith("[TensorRT INFO] ") for ln in lines) > 3
    res = CliRunner().invoke(main, ["build", str(src), "--recipe", "rtx4090-fp32", "-o", str(tmp_path / "e2")])
    assert res.exit_code == 2 and "[TensorRT" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("error: TensorRT failed to build block embed: ")


def test_build_command_with_recipe_path(export, tmp_path):
    from click.testing import CliRunner

    from dualbrain.cli import _Group
    from dualbrain.recipes.cli import build as build_cmd

    recipe = tmp_path / "small.toml"
    recipe.write_text((RECIPE_DIR / "rtx4090-fp32.toml").read_text().replace(
        'name = "rtx4090-fp32"', 'name = "small"').replace("max_batch = 2", "max_batch = 1"))
    out = tmp_path / "engines"
    res = CliRunner().invoke(_Group(commands={"build": build_cmd}),
                             ["build", str(export("dense", "float32")), "--recipe", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "built 6 engines for rtx4090 (8.9)" in res.output
    man = json.loads((out / ENGINE_MANIFEST).read_text())
    assert man["recipe"]["name"] == "small" and man["profiles"][0]["dims"]["batch"] == [1, 1, 1]


def test_wrong_precision_export_is_refused(export, tmp_path):
    with pytest.raises(DualbrainError, match="expects a float16 export, this export is float32"):
        build(export("dense", "float32"), "rtx4090-fp16", tmp_path / "e")
    with pytest.raises(DualbrainError, match="--quant int4-weight-only"):
        build(export("dense", "float32"), "rtx5090-int4", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_plugin_marked_onnx_copy(export, tmp_path):
    from dualbrain.plugins.tensorrt import tensorrt_onnx, write_tensorrt_onnx

    src = export("moe", "float32") / "layer_000.onnx"
    model = tensorrt_onnx(src)
    marked = [n for n in model.graph.node if n.domain == "dualbrain"]
    assert len(marked) == 3 and not model.functions
    assert all({a.name: a for a in n.attribute}["plugin_namespace"].s == b"dualbrain" for n in marked)
    locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"layer_000.onnx.data"}              # still relative to the export directory
    with pytest.raises(DualbrainError, match="same directory"):
        write_tensorrt_onnx(src, tmp_path / "x.onnx")


# --- the tensorrt backend: refusals happen before any GPU is needed ---------------------------------

def _engines_copy(engines, tmp_path, **changes) -> tuple[Path, Path]:
    out, man = engines("rtx4090-fp32", "dense")
    dst = tmp_path / "engines"
    shutil.copytree(out, dst)
    m = json.loads((dst / ENGINE_MANIFEST).read_text())
    m.update(changes)
    (dst / ENGINE_MANIFEST).write_text(json.dumps(m))
    return Path(man["export"]["path"]), dst


def test_backend_refuses_other_tensorrt_version(engines, tmp_path):
    src, dst = _engines_copy(engines, tmp_path, tensorrt_version="1.6.0.1")
    with pytest.raises(DualbrainError, match=r"built with TensorRT-RTX 1\.6\.0\.1, installed is "):
        load_backend("tensorrt", src, load_manifest(src), engines=dst)


def test_backend_refuses_other_gpu(engines, tmp_path):
    src, dst = _engines_copy(engines, tmp_path)
    with pytest.raises(DualbrainError, match="engines target compute capability 8.9, this GPU is 8.6"):
        load_backend("tensorrt", src, load_manifest(src), engines=dst, device_capability=(8, 6))


def test_backend_refuses_other_flavour_and_export(engines, export, tmp_path):
    src, dst = _engines_copy(engines, tmp_path, flavour="tensorrt")
    with pytest.raises(DualbrainError, match="enterprise TensorRT"):
        load_backend("tensorrt", src, load_manifest(src), engines=dst, device_capability="8.9")
    _, dst2 = _engines_copy(engines, tmp_path / "b")
    other = export("dense", "float16")
    with pytest.raises(DualbrainError, match="built from a float32 export, this export is float16"):
        load_backend("tensorrt", other, load_manifest(other), engines=dst2, device_capability="8.9")


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_gpu(), reason="running TensorRT engines needs a CUDA GPU (CI has none); "
                                           "also needs the plugins' Triton kernels (pip install 'dualbrain[triton]')")
def test_engines_match_onnxruntime_on_gpu(engines):
    from dualbrain.runtime.model import Model

    out, man = engines("rtx4090-fp32", "moe")
    src = Path(man["export"]["path"])
    ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    ref, ours = Model.load(src), Model.load(src, backend="tensorrt", engines=out)
    a = ref.forward(ids, ref.new_state(1), all_logits=True)
    b = ours.forward(ids, ours.new_state(1), all_logits=True)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)


def test_window_variants_build(artifacts, tmp_path):
    """Every GDN layer's window variant (per-position states, for rollback) gets its own engine, built
    with the window plugins; blocks without one get none."""
    src = artifacts.export(artifacts.checkpoint("dense", "causal"))
    man = build(src, "rtx4090-fp32", tmp_path / "engines")
    gdn = next(b for b in man["blocks"] if b["name"] == "layer_000")["window"]
    assert [(p["type"], p["plugin"]) for p in gdn["plugins"]] == [
        ("PLUGIN_V3", "CausalConv1dWindow"), ("PLUGIN_V3", "GatedDeltaRuleWindow")]
    assert gdn["plugins"][1]["fields"] == {"num_k_heads": 2, "num_v_heads": 4}
    data = (tmp_path / "engines" / gdn["engine"]).read_bytes()
    assert len(data) == gdn["size"] > 0 and hashlib.sha256(data).hexdigest() == gdn["sha256"]
    assert [b["name"] for b in man["blocks"] if b["window"]] == ["layer_000", "layer_001", "layer_002"]
