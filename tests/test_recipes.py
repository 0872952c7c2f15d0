"""Engine build recipes: bundled ones load, the schema refuses what it should, precision is checked.

No TensorRT and no export needed: a hand-written export manifest is enough to reach the checks.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dualbrain.errors import DualbrainError
from dualbrain.recipes.schema import bundled_recipes, load_recipe

GOOD = """
name = "mine"
target = "rtx4090"
flavour = "tensorrt-rtx"
compute_capabilities = [8.9]
precision = "float16"

[profile]
max_batch = 2
max_prefill = 256
max_context = 1024
opt_context = 512
"""


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def fake_export(tmp_path: Path, dtype: str) -> Path:
    """The smallest directory load_manifest accepts (one empty block file)."""
    d = tmp_path / f"export-{dtype}"
    d.mkdir()
    from dualbrain.exporter.tiny import text_config_dict
    from dualbrain.runtime.manifest import VERSION
    from dualbrain.runtime.spec import ModelSpec

    spec = ModelSpec.from_config(dict(text_config_dict(family="dense", num_layers=1), model_type="qwen3_5_text",
                                      layer_types=["full_attention"]))
    for f in ("embed.onnx", "layer_000.onnx", "head.onnx"):
        (d / f).write_bytes(b"")
    (d / "manifest.json").write_text(json.dumps({
        "format": "dualbrain-export", "version": VERSION, "model": spec.to_json(), "dtype": dtype, "opset": 18,
        "max_context": 64, "window": False, "files": {f: {"size": 0} for f in ("embed.onnx", "layer_000.onnx",
                                                                            "head.onnx")},
        "blocks": [{"name": "embed", "kind": "embed", "file": "embed.onnx", "inputs": [], "outputs": []},
                   {"name": "layer_000", "kind": "full_attention", "layer": 0, "file": "layer_000.onnx",
                    "inputs": [], "outputs": []},
                   {"name": "head", "kind": "head", "file": "head.onnx", "inputs": [], "outputs": []}]}))
    return d


def test_bundled_recipes_load():
    names = bundled_recipes()
    for want in ("rtx4090-fp16", "rtx4090-fp32", "rtx5090-bf16", "rtx5090-int4", "orin-fp16", "h100-bf16", "h100-fp8"):
        assert want in names
    for n in names:
        r = load_recipe(n)
        assert r.name == n and r.source == f"{n}.toml"
    assert load_recipe("rtx5090-bf16").compute_capabilities == ("12.0",)
    assert load_recipe("h100-bf16").flavour == "tensorrt"      # TensorRT-RTX cannot target Hopper


def test_recipe_by_path(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert (r.name, r.precision, r.profile.max_batch, r.profile.min_batch) == ("mine", "float16", 2, 1)


@pytest.mark.parametrize("edit, message", [
    (("max_batch = 2", "max_batchh = 2"), "recipe mine.toml: unknown key 'max_batchh' in [profile]"),
    (('precision = "float16"', 'precision = "float16"\nspeed = 3'), "unknown key 'speed' in the top level"),
    (("max_batch = 2", 'max_batch = "2"'), "key 'max_batch' in [profile] must be an integer, got string"),
    (("max_batch = 2", "max_batch = true"), "key 'max_batch' in [profile] must be an integer"),
    (('flavour = "tensorrt-rtx"', "flavour = 1"), "key 'flavour' must be a string"),
    (("max_batch = 2", "max_batch = 0"), "key 'max_batch' in [profile] must be >= 1"),
    (("max_batch = 2", "max_batch = 2\nopt_batch = 3"), "key 'opt_batch' in [profile] (3) must be <= max_batch"),
    (("max_context = 1024", "max_context = 128"), "key 'opt_context' in [profile] (512) must be <= max_context (128)"),
    (("max_prefill = 256", "max_prefill = 2048"), "key 'max_prefill' in [profile] (2048) must be <= max_context"),
    (('precision = "float16"', 'precision = "int3"'), "key 'precision' must be one of"),
    (('target = "rtx4090"', 'target = "rtx3090"'), "key 'target' must be one of"),
    (("compute_capabilities = [8.9]", "compute_capabilities = [8.6]"), "must include 8.9"),
    (("compute_capabilities = [8.9]", "compute_capabilities = [8.9, 9.0]"), "9.0, which TensorRT-RTX cannot target"),
    (("compute_capabilities = [8.9]", "compute_capabilities = 8.9"), "key 'compute_capabilities' must be a non-empty list"),
    (('precision = "float16"', 'precision = "float16"\noptimization_level = 7'), "key 'optimization_level' must be between 0 and 5"),
    (("name = \"mine\"\n", ""), "missing key 'name'"),
])
def test_schema_refuses(tmp_path, edit, message):
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(DualbrainError) as e:
        load_recipe(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_name_and_bad_toml(tmp_path):
    with pytest.raises(DualbrainError, match="unknown recipe 'rtx9999'.*rtx4090-fp16"):
        load_recipe("rtx9999")
    with pytest.raises(DualbrainError, match="invalid TOML"):
        load_recipe(write(tmp_path, "name = "))
    with pytest.raises(DualbrainError, match="not found"):
        load_recipe(tmp_path / "nope.toml")


def test_recipe_refuses_other_precision(tmp_path):
    from dualbrain.recipes.build import build

    export = fake_export(tmp_path, "float32")
    with pytest.raises(DualbrainError, match="rtx4090-fp16 expects a float16 export, this export is float32"):
        build(export, "rtx4090-fp16", tmp_path / "engines")
    with pytest.raises(DualbrainError, match=r"expects a int4-weight-only export, this export is float32 "
                                             r"\(export again with `dualbrain export --dtype float16\|bfloat16 "
                                             r"--quant int4-weight-only`\)"):
        build(export, "rtx5090-int4", tmp_path / "engines")
    with pytest.raises(DualbrainError, match="--quant fp8"):
        load_recipe("h100-fp8").check_precision("bfloat16")
    assert not (tmp_path / "engines").exists() and not (tmp_path / "engines.partial").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="enterprise TensorRT is installed")
def test_enterprise_recipe_refused_without_tensorrt(tmp_path):
    from dualbrain.recipes.build import build

    with pytest.raises(DualbrainError, match="orin-fp16 needs enterprise TensorRT"):
        build(fake_export(tmp_path, "float16"), "orin-fp16", tmp_path / "engines")


def test_build_command_reports_one_line(tmp_path):
    from click.testing import CliRunner

    from dualbrain.cli import _Group
    from dualbrain.recipes.cli import build

    group = _Group(commands={"build": build})
    res = CliRunner().invoke(group, ["build", str(fake_export(tmp_path, "float32")), "--recipe", "rtx4090-fp16",
                                     "-o", str(tmp_path / "engines")])
    assert res.exit_code == 2
    assert "error: recipe rtx4090-fp16 expects a float16 export" in res.output


def test_no_heavy_imports():
    """Loading the runtime, the recipes and the plugin machinery imports neither TensorRT nor torch."""
    code = ("import sys, dualbrain.runtime.backends, dualbrain.runtime.backends.tensorrt, dualbrain.recipes.build, "
            "dualbrain.recipes.cli, dualbrain.plugins.tensorrt\n"
            "from dualbrain.plugins.tensorrt import all_descs; all_descs()\n"
            "bad = [m for m in ('tensorrt_rtx', 'tensorrt', 'torch', 'triton') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_profiles_serve_the_runtimes_prefill_chunks():
    """The runtime prefills a prompt in chunks of `prefill_chunk` positions (runtime.engine, 512 by
    default): every recipe's engines take one such chunk per call and are tuned for it; the context
    is the recipe's cap or the export's, whichever is smaller; decode takes 1 (tuned) up to 2 new
    positions (TensorRT-RTX has no fused attention kernel for exactly 1)."""
    import inspect

    from dualbrain.recipes.build import profile_dims
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.engines import call_limits

    chunk = inspect.signature(Engine).parameters["prefill_chunk"].default
    for name in bundled_recipes():
        p = load_recipe(name).profile
        assert p.opt_prefill == chunk <= p.max_prefill, name
    r = load_recipe("rtx4090-fp16")
    for export_context, served in ((262144, 32768), (4096, 4096)):
        dims = profile_dims(r, export_context)
        assert dims["prefill"] == {"batch": [1, 1, 4], "seq": [1, 512, 512], "past": [0, 0, served - 1],
                                   "total": [1, 512, served]}
        assert dims["decode"]["seq"] == [1, 1, 2] and dims["decode"]["total"][2] == served
        assert call_limits([{"name": n, "dims": d} for n, d in dims.items()]) == {
            "max_batch": 4, "max_new_positions": 512, "max_context": served}
