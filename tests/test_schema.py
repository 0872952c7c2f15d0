"""The shared schema: one dtype table, the block-kind registry, op identity, the engine manifest type,
and exports written by an older manifest version."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from dualbrain.errors import DualbrainError
from dualbrain.runtime import dtypes
from dualbrain.runtime.backends.tensorrt import TensorRTBackend
from dualbrain.runtime.blocks import KINDS, MODEL_INPUTS, model_blocks, random_feeds
from dualbrain.runtime.manifest import load_manifest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def dense_export(artifacts):
    pytest.importorskip("torch")
    return artifacts.export(artifacts.checkpoint("dense", "conditional"))


# ---- the dtype table against each framework's own idea of the type --------------------------------

@pytest.mark.parametrize("d", dtypes.TABLE, ids=lambda d: d.name)
def test_dtype_table_matches_numpy_and_onnx(d):
    import onnx

    np_dt = dtypes.numpy_dtype(d.name)
    assert np_dt.itemsize == d.itemsize
    assert onnx.helper.tensor_dtype_to_np_dtype(d.onnx) == np_dt
    assert dtypes.from_onnx(d.onnx) is d


@pytest.mark.parametrize("d", dtypes.TABLE, ids=lambda d: d.name)
def test_dtype_table_matches_torch_and_safetensors(d, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from dualbrain.exporter.checkpoint import read_header

    t = torch.zeros(3, dtype=dtypes.torch_dtype(d.name))
    assert t.element_size() == d.itemsize and dtypes.from_torch(t.dtype) is d
    save_file({"x": t}, str(tmp_path / "x.safetensors"))
    header = read_header(tmp_path / "x.safetensors")      # our reader, on safetensors' own file
    assert header["x"]["dtype"] == d.safetensors and dtypes.from_safetensors(d.safetensors) is d


def test_dtype_table_matches_tensorrt():
    trt = pytest.importorskip("tensorrt_rtx")
    for d in dtypes.TABLE:
        if d.trt is None:
            continue
        dt = dtypes.trt_dtype(trt, d.name)
        assert dtypes.from_trt(trt, dt) is d
        if d.name not in ("bfloat16", "float8_e4m3fn"):      # trt.nptype has no numpy type for these
            assert np.dtype(trt.nptype(dt)) == dtypes.numpy_dtype(d.name)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(DualbrainError, match="unknown dtype 'float12'"):
        dtypes.dtype("float12")


# ---- the block-kind registry -------------------------------------------------------------------

def _spec(family="moe", window=False):
    from dualbrain.exporter.tiny import text_config_dict
    from dualbrain.runtime.spec import ModelSpec

    return ModelSpec.from_config(dict(text_config_dict(family=family, num_layers=4),
                                      model_type="qwen3_5_moe_text" if family == "moe" else "qwen3_5_text"))


def test_every_kind_declares_a_consistent_chain():
    """Each block's chain input is among its inputs, its output among its outputs, every state input is
    an input and every state output an output; only model inputs, the chain input and state are fed;
    window outputs exist exactly for the per-position states of GDN layers."""
    spec = _spec()
    plan = model_blocks(spec)
    assert [p.kind.name for p in plan] == ["embed", *spec.layer_types, "head"]
    assert [p.layer for p in plan] == [None, 0, 1, 2, 3, None]
    for p in plan:
        sig = p.kind.signature(spec, "float32")
        ins, outs = {t.name for t in sig.inputs}, {t.name for t in sig.outputs}
        window = {t.name for t in sig.window_outputs}
        assert (p.kind.takes is None) == (p is plan[0]) and (p.kind.takes in ins or p.kind.takes is None)
        assert p.kind.gives in outs
        assert {s.input for s in sig.state} <= ins and {s.output for s in sig.state} <= outs
        assert ins == {s.input for s in sig.state} | ({p.kind.takes} - {None}) | (ins & set(MODEL_INPUTS))
        assert {s.window_output for s in sig.state if s.window_output} == window and not window & outs
        assert bool(window) == (p.kind.name == "linear_attention")


def test_registry_modules_forward_takes_the_signature():
    """The torch module each kind names takes exactly its signature's inputs, in order."""
    import inspect

    pytest.importorskip("torch")
    spec = _spec()
    for p in model_blocks(spec):
        params = list(inspect.signature(p.kind.torch_module().forward).parameters.values())[1:]
        names = [t.name for t in p.kind.signature(spec, "float32").inputs]
        fixed = [q for q in params if q.kind is not inspect.Parameter.VAR_POSITIONAL]
        assert [q.name for q in fixed] == names[:len(fixed)]
        assert len(fixed) == len(names) or params[-1].kind is inspect.Parameter.VAR_POSITIONAL


def test_random_feeds_follow_the_signature():
    spec = _spec()
    sig = KINDS["full_attention"].signature(spec, "float32")
    feeds = random_feeds(sig.inputs, spec.vocab_size, batch=3, seq=4, past=5, seed=1)
    assert feeds["past_key"].shape == (5, 3, spec.num_kv_heads, spec.head_dim)
    assert feeds["attention_mask"].shape == (3, 9) and feeds["attention_mask"].all()
    assert (feeds["position_ids"] == np.arange(5, 9)).all() and feeds["hidden"].dtype == np.float32
    assert np.abs(feeds["hidden"]).max() > 0


def test_manifest_with_an_unknown_block_kind_is_refused(dense_export, tmp_path):
    import shutil

    d = tmp_path / "x"
    shutil.copytree(dense_export, d)
    m = json.loads((d / "manifest.json").read_text())
    m["blocks"][1]["kind"] = "mamba2"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DualbrainError, match="unknown block kind 'mamba2'"):
        load_manifest(d)


def test_manifest_model_is_a_typed_spec(dense_export):
    from dualbrain.runtime.spec import ModelSpec

    man = load_manifest(dense_export)
    assert isinstance(man.model, ModelSpec) and man.model.layer_types[-1] == "full_attention"
    assert json.loads(json.dumps(man.to_json()))["model"] == json.loads((dense_export / "manifest.json").read_text())["model"]


# ---- op identity ---------------------------------------------------------------------------------

def test_op_identity_is_the_one_the_graph_and_plugins_use(dense_export):
    import onnx

    from dualbrain.plugins import DOMAIN, identities
    from dualbrain.plugins.tensorrt import NAMESPACE, all_descs

    ops = {t for i in identities() for t in i.op_types}
    assert ops == {"CausalConv1d", "CausalConv1dWindow", "GatedDeltaRule", "GatedDeltaRuleWindow", "MoEDispatch"}
    assert {d.name for d in all_descs()} == ops and NAMESPACE == DOMAIN
    for file, ops in (("layer_000.onnx", {"CausalConv1d", "GatedDeltaRule"}),
                      ("layer_000.window.onnx", {"CausalConv1dWindow", "GatedDeltaRuleWindow"})):
        graph = onnx.load(str(dense_export / file), load_external_data=False)
        used = {(n.domain, n.op_type) for n in graph.graph.node if n.domain == DOMAIN}
        assert used == {(DOMAIN, op) for op in ops}
        assert used <= {(f.domain, f.name) for f in graph.functions}


def test_attach_functions_conflicting_version_is_refused():
    import onnx
    from onnx import helper

    from dualbrain.plugins import attach_functions

    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 18),
                                                                                   helper.make_opsetid("dualbrain", 7)])
    with pytest.raises(ValueError, match="'dualbrain' version 7"):
        attach_functions(model)
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 18)])
    assert attach_functions(model) == 18 and attach_functions(model) == 18        # idempotent
    assert len(model.functions) == 5 and {o.domain for o in model.opset_import} == {"", "dualbrain", "com.microsoft"}
    onnx.checker.check_model(model)


# ---- exports written by an older manifest version ------------------------------------------------

def test_version_2_export_is_refused_with_re_export(tmp_path):
    """tests/data/export-v2/manifest.json is the manifest dualbrain wrote at 19ed9a0 (version 2, no
    window variants). Loading it says to re-export, on one line with exit code 2."""
    from click.testing import CliRunner

    from dualbrain.cli import main

    with pytest.raises(DualbrainError, match="manifest version 2.*re-export with this version"):
        load_manifest(DATA / "export-v2")
    res = CliRunner().invoke(main, ["generate", str(DATA / "export-v2"), "--ids", "1,2"])
    assert res.exit_code == 2 and "re-export with this version" in res.output


# ---- the engine manifest type and the TensorRT backend's dtypes (no GPU) ------------------------

def test_engine_manifest_round_trip_and_checks(dense_export, tmp_path):
    from dualbrain.runtime.engines import ENGINE_MANIFEST, EngineBlock, EngineManifest

    man = load_manifest(dense_export)
    em = EngineManifest(
        flavour="tensorrt-rtx", tensorrt_version="1.7.1.116", compute_capabilities=("8.9",), target="rtx4090",
        recipe={"name": "r"}, profiles=({"name": "prefill", "dims": {"batch": [1, 1, 2]}},), timing_cache=None,
        export={"dtype": man.dtype, "model": json.loads(json.dumps(man.model.to_json()))},
        blocks=tuple(EngineBlock(b.name, b.kind, b.layer, b.file, f"{b.name}.engine", 10, "0" * 64, 0.5, (),
                                 b.inputs, b.outputs, b.state) for b in man.blocks))
    written = em.write(tmp_path)
    assert json.loads((tmp_path / ENGINE_MANIFEST).read_text()) == written
    back = EngineManifest.read(tmp_path)
    assert back == em
    back.check(man, flavour="tensorrt-rtx", version="1.7.1.116", device_capability=(8, 9))
    with pytest.raises(DualbrainError, match="this GPU is 12.0"):
        back.check(man, flavour="tensorrt-rtx", version="1.7.1.116", device_capability="12.0")
    other = dataclasses.replace(back, blocks=back.blocks[:1] + (dataclasses.replace(
        back.blocks[1], inputs=back.blocks[1].inputs[:-1]),) + back.blocks[2:])
    with pytest.raises(DualbrainError, match="engine for block layer_000 has other inputs/outputs"):
        other.check(man, flavour="tensorrt-rtx", version="1.7.1.116", device_capability="8.9")
    d = json.loads((tmp_path / ENGINE_MANIFEST).read_text())
    d["blocks"][0]["inputs"] = [{"name": 3}]
    (tmp_path / ENGINE_MANIFEST).write_text(json.dumps(d))
    with pytest.raises(DualbrainError, match="engines.json: malformed tensor entry in embed"):
        EngineManifest.read(tmp_path)


class _TensorRTLikeBackend:
    """The TensorRT backend's dtype handling (bf16 in, bf16 out, through its own torch conversions) in
    front of ONNX Runtime's fp32 CPU sessions: what `generate --backend tensorrt` does on a bf16 export,
    minus the GPU."""
    name = "tensorrt-like"
    has_linked = False
    max_batch = max_new_positions = None
    compute_dtype = TensorRTBackend.compute_dtype

    def __init__(self, ort):
        self.ort = ort

    def run(self, block, feeds, *, window=False):
        import torch

        from dualbrain.runtime.backends.tensorrt import _to_numpy, _to_torch

        fp32 = {k: _to_torch(v, "cpu").float().numpy() if v.dtype == dtypes.numpy_dtype("bfloat16") else v
                for k, v in feeds.items()}
        out = self.ort.run(block, fp32, window=window)
        types = {t.name: t.dtype for t in block.graph(window)[1]}
        return {k: _to_numpy(torch.from_numpy(v).to(torch.bfloat16)) if types[k] == "bfloat16" else v
                for k, v in out.items()}


def test_bfloat16_export_on_the_tensorrt_backend_dtypes(artifacts):
    """`generate --backend tensorrt` on a bf16 export used to raise KeyError: the runtime had no numpy
    type for bfloat16. The state and feeds are now ml_dtypes bfloat16 and generation runs."""
    import ml_dtypes

    pytest.importorskip("torch")
    from dualbrain.runtime.backends.onnxruntime import OrtBackend
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    out = artifacts.export(artifacts.checkpoint("moe", "causal", dtype="bfloat16"), dtype="bfloat16")
    man = load_manifest(out)
    model = Model(out, man, _TensorRTLikeBackend(OrtBackend(out, man, linked=False)))
    assert model.dtype == "bfloat16" and model.np_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    st = model.new_state(2)
    assert st.layers[0]["conv_state"].dtype == ml_dtypes.bfloat16
    assert st.layers[0]["recurrent_state"].dtype == np.float32
    g = generate(model, [[5, 17, 300], [9, 8]], SamplingParams(greedy=True, max_new_tokens=6))
    assert all(len(x.new_ids) == 6 and all(0 <= i < model.vocab_size for i in x.new_ids) for x in g)
    ref = Model.load(out, linked=False)            # ONNX Runtime computing the bf16 export in fp32
    ids = np.array([[5, 17, 300, 4]])
    a = ref.forward(ids, ref.new_state(1))
    b = model.forward(ids, model.new_state(1))
    np.testing.assert_allclose(b, a, rtol=0, atol=0.05 * np.abs(a).max())
