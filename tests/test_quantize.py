"""`dualbrain export --quant int4-weight-only`: blockwise int4 linear weights (DequantizeLinear-21).

One fp16 int4 export of the tiny dense checkpoint (bf16 on disk) is made here, at module scope; the
unquantized fp16 export it is compared with comes from the session-wide `artifacts` cache (the
same key test_precision / test_trt_build use, so a full run makes no extra unquantized export).
Small hand-built graphs cover the pass itself (Gemm, bf16, skipped weights) without torch.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dualbrain.errors import DualbrainError
from dualbrain.exporter.export import EXPORT_OPSET
from dualbrain.exporter.quantize import (
    INT4_WEIGHT_ONLY, block_size_for, dequantize_int4, pack_int4, quantize_block, quantize_int4, unpack_int4,
)
from dualbrain.recipes.schema import load_recipe
from dualbrain.runtime.manifest import load_manifest

POSITIONS, PREFILL = 256, 128


@pytest.fixture(scope="module")
def ckpt(artifacts):
    return artifacts.checkpoint("dense", dtype="bfloat16")


@pytest.fixture(scope="module")
def fp16(artifacts, ckpt):
    return artifacts.export(ckpt, dtype="float16")


@pytest.fixture(scope="module")
def int4(ckpt, tmp_path_factory):
    from dualbrain.exporter.export import export_checkpoint

    return export_checkpoint(ckpt, tmp_path_factory.mktemp("quant") / "int4", dtype="float16",
                             quant=INT4_WEIGHT_ONLY)


def _session(model: onnx.ModelProto, exact: bool = False):
    """An ORT CPU session. ORT fuses DequantizeLinear(int4, axis 0, blocks) -> MatMul into MatMulNBits,
    which by default (accuracy level 4) computes with int8-quantized activations; `exact` asks for
    fp32 compute instead (accuracy level 1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# --- the numerics ----------------------------------------------------------------------------------

def test_block_size_choice():
    assert [block_size_for(k) for k in (4096, 192, 96, 64, 32, 48, 100)] == [128, 64, 32, 64, 32, None, None]


def test_pack_roundtrip_and_nibble_order():
    q = np.array([1, -1, 7, -8, 3], np.int8)
    raw = pack_int4(q)
    assert raw == bytes([0xF1, 0x87, 0x03])           # first value in the low nibble, odd count padded
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (64, 33)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(q), q.shape), q)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_error_bound(dtype):
    import ml_dtypes

    dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((256, 48)) * 0.05).astype(dt)
    w[:128, 0] = 0                                    # an all-zero block: scale 0, q 0, no NaN
    q, scale = quantize_int4(w, 128, dt)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and scale.shape == (2, 48) and scale.dtype == dt
    dq = dequantize_int4(q, scale, 128).astype(np.float32)
    assert np.all(np.isfinite(dq)) and np.all(dq[:128, 0] == 0)
    # the scale search may clip the largest weights a little (scale down to 0.8 max|w| / 7) to refine the
    # rest: every error stays within 1.5 steps of the plain scale max|w| / 7
    plain = np.abs(w.astype(np.float32)).reshape(2, 128, 48).max(axis=1) / 7
    bound = np.repeat(plain, 128, axis=0) * 1.5
    eps = float(ml_dtypes.finfo(dt).eps)              # dq itself is rounded to the export dtype
    assert np.all(np.abs(dq - w.astype(np.float32)) <= bound * (1 + eps) + np.abs(dq) * eps)


# --- the pass on hand-built graphs -----------------------------------------------------------------

def _graph(tmp_path, dtype: int, np_dtype, name="g"):
    """x[B, 64] -> MatMul(x, Transpose(W1[96, 64])) -> MatMul(., W2[96, 32]) -> Gemm(., W3[16, 32], transB=1)
    plus an embedding table (Gather) and a 48-wide weight (no block size divides 48)."""
    rng = np.random.default_rng(2)
    w = {"W1": (96, 64), "W2": (96, 32), "W3": (16, 32), "E": (10, 16), "W4": (48, 16)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np_dtype), n) for n, s in w.items()]
    if dtype == TensorProto.BFLOAT16:
        for t in inits:       # numpy_helper writes ml_dtypes bf16 as raw bf16 already; make sure of the type
            assert t.data_type == TensorProto.BFLOAT16
    nodes = [
        helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1t"], ["h1"]),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"]),
        helper.make_node("Gemm", ["h2", "W3"], ["h3"], transB=1),
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("Add", ["h3", "e"], ["h4"]),
        helper.make_node("Transpose", ["W4"], ["W4t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h4", "W4t"], ["y"]),
    ]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", dtype, ["b", 64]),
                                        helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                          [helper.make_tensor_value_info("y", dtype, ["b", 48])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{name}.onnx.data", size_threshold=0)
    return path, {t.name: numpy_helper.to_array(t) for t in inits}


def _run(path, x, ids, to_fp32=False, exact=False):
    from dualbrain.runtime.backends.onnxruntime import bf16_to_fp32

    model = onnx.load(str(path))
    if to_fp32:
        bf16_to_fp32(model)
    return _session(model, exact).run(["y"], {"x": x, "ids": ids})[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pass_on_a_hand_built_graph(tmp_path, dtype):
    import ml_dtypes

    ndt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    odt = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    path, w = _graph(tmp_path, odt, ndt)
    size_before = (tmp_path / "g.onnx.data").stat().st_size
    res = quantize_block(path)
    assert res["quantized"] == {"W1": 64, "W2": 32, "W3": 32}
    assert set(res["skipped"]) == {"W4"}
    assert (tmp_path / "g.onnx.data").stat().st_size < size_before
    assert not list(tmp_path.glob("*quant-tmp*"))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 3 and ops.count("Transpose") == 1     # W1's Transpose folded
    assert {n.input[0] for n in model.graph.node if n.op_type == "Gather"} == {"E"}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert {a.name: a.i for a in gemm.attribute}["transB"] == 0
    inits = {t.name: t for t in model.graph.initializer}
    assert {inits[n].data_type for n in ("E", "W4", "W1.scale", "W2.scale", "W3.scale")} == {odt}
    assert inits["W1.int4"].data_type == TensorProto.INT4 and list(inits["W1.int4"].dims) == [64, 96]
    # the int4 graph computes what the reference dequantized weights give (fp32 compute for bf16)
    ref = {}
    for name, block, tr in (("W1", 64, True), ("W2", 32, False), ("W3", 32, True)):
        q, s = quantize_int4(w[name].T if tr else w[name], block, ndt)
        # bf16 runs through the CPU backend's bf16 -> fp32 rewrite: scales fp32, q * scale unrounded
        ref[name] = (dequantize_int4(q, s, block) if dtype == "float16"
                     else q.astype(np.float32) * np.repeat(s.astype(np.float32), block, axis=0)).astype(np.float32)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ids = np.array([0, 3, 9, 1, 2], np.int64)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    want = ((x @ ref["W1"]) @ ref["W2"]) @ ref["W3"] + f32(w["E"])[ids]
    want = want @ f32(w["W4"]).T
    scale = np.abs(want).max()
    if dtype == "bfloat16":
        got = _run(path, x, ids, to_fp32=True, exact=True)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
        fused = _run(path, x, ids, to_fp32=True)        # default: int8 activations in the fused int4 GEMM
    else:
        got = _run(path, x.astype(np.float16), ids, exact=True).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-3 * scale)          # fp16 compute
        fused = _run(path, x.astype(np.float16), ids).astype(np.float32)
    np.testing.assert_allclose(fused, want, rtol=0, atol=3e-2 * scale)


def test_single_block_weight_stays_float():
    """A [1, H] weight (a tiny MoE's shared-expert gate) with H one block: TensorRT refuses the
    blockwise DequantizeLinear of its one-element scale, so it stays in the export dtype."""
    from dualbrain.exporter.quantize import plan_weights

    inits = [numpy_helper.from_array(np.ones((1, 64), np.float16), "gate"),
             numpy_helper.from_array(np.ones((2, 64), np.float16), "two")]
    nodes = [helper.make_node("Transpose", ["gate"], ["gate_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "gate_t"], ["g"]),
             helper.make_node("Transpose", ["two"], ["two_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "two_t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 64])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT16, None) for n in ("g", "y")], inits)
    plans, skipped = plan_weights(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    assert [p.name for p in plans] == ["two"] and skipped == [("gate", "a single 64 x 1 block")]


def test_pass_refuses_old_opset(tmp_path):
    path, _ = _graph(tmp_path, TensorProto.FLOAT16, np.float16)
    model = onnx.load(str(path), load_external_data=False)
    model.opset_import[0].version = 20
    onnx.save(model, str(path))
    with pytest.raises(DualbrainError, match="opset >= 21"):
        quantize_block(path)


# --- the export --------------------------------------------------------------------------------------

def test_int4_export_manifest_and_graphs(int4, fp16):
    man = load_manifest(int4, verify_hashes=True)            # new hashes and sizes recorded
    assert man.quant == INT4_WEIGHT_ONLY and man.dtype == "float16" and man.opset == EXPORT_OPSET >= 21
    assert json.loads((int4 / "manifest.json").read_text())["quant"] == INT4_WEIGHT_ONLY
    assert load_manifest(fp16).quant is None
    ref_man = load_manifest(fp16)
    mtp = man.side("mtp")       # the MTP head keeps the float dtype: quantizing it hurts acceptance
    if mtp is not None:
        assert not any(n.op_type == "DequantizeLinear"
                       for n in onnx.load(str(int4 / mtp.file), load_external_data=False).graph.node)
    for b in man.chain:
        model = onnx.load(str(int4 / b.file), load_external_data=False)
        onnx.checker.check_model(str(int4 / b.file), full_check=True)
        assert next(o.version for o in model.opset_import if o.domain == "") == EXPORT_OPSET
        assert all(next(o.version for o in f.opset_import if o.domain == "") == EXPORT_OPSET for f in model.functions)
        inits = {t.name: t for t in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        # no float matrix feeds a MatMul any more: every MatMul weight is a DequantizeLinear output
        prod = {o: n for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            if n.op_type == "MatMul" and n.input[1] in inits:
                pytest.fail(f"{b.name}: MatMul {n.name} still reads initializer {n.input[1]}")
            if n.op_type == "MatMul" and n.input[1] in prod and prod[n.input[1]].op_type == "Transpose":
                assert prod[n.input[1]].input[0] not in inits, f"{b.name}: unquantized weight via Transpose"
        if b.kind == "embed":
            assert not dq and inits["weight"].data_type == TensorProto.FLOAT16
        else:
            assert dq, b.name
        for n in dq:
            attrs = {a.name: a.i for a in n.attribute}
            q, s = inits[n.input[0]], inits[n.input[1]]
            assert q.data_type == TensorProto.INT4 and s.data_type == TensorProto.FLOAT16 and len(n.input) == 2
            assert attrs["axis"] == 0 and attrs["block_size"] == block_size_for(q.dims[0])
            assert list(s.dims) == [q.dims[0] // attrs["block_size"], q.dims[1]]
        # norms stay in the export dtype
        assert all(t.data_type in (TensorProto.FLOAT16, TensorProto.FLOAT) for t in inits.values()
                   if len(t.dims) == 1 and t.data_type not in (TensorProto.INT64, TensorProto.INT32))
        if b.kind != "embed":
            assert (int4 / f"{b.file}.data").stat().st_size < 0.5 * (fp16 / f"{ref_man.block(b.name).file}.data").stat().st_size


def test_dequantized_weights_equal_the_numpy_reference(int4, fp16):
    """ONNX Runtime's DequantizeLinear of every stored int4 weight == numpy quantize -> dequantize of
    the unquantized export's weight, bit for bit."""
    checked = 0
    for block in ("layer_000", "layer_003", "head"):
        qm = onnx.load(str(int4 / f"{block}.onnx"), load_external_data=False)
        onnx.load_external_data_for_model(qm, str(int4))
        rm = onnx.load(str(fp16 / f"{block}.onnx"))
        ref = {t.name: numpy_helper.to_array(t) for t in rm.graph.initializer}
        transposed = {n.input[0] for n in rm.graph.node if n.op_type == "Transpose"}
        inits = {t.name: t for t in qm.graph.initializer}
        for n in qm.graph.node:
            if n.op_type != "DequantizeLinear":
                continue
            qt, st = inits[n.input[0]], inits[n.input[1]]
            bs = next(a.i for a in n.attribute if a.name == "block_size")
            name = qt.name.removesuffix(".int4")
            w = ref[name].T if name in transposed else ref[name]   # [N, K] behind a Transpose in fp16
            q, s = quantize_int4(w, bs, np.float16)
            assert np.array_equal(unpack_int4(qt.raw_data, tuple(qt.dims)), q), qt.name
            assert np.array_equal(numpy_helper.to_array(st), s), st.name
            g = helper.make_graph([n], "dq", [], [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT16,
                                                                                 list(qt.dims))], [qt, st])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
            m.ir_version = 10
            got = _session(m).run(None, {})[0]
            want = dequantize_int4(q, s, bs)
            assert got.dtype == np.float16 and np.array_equal(got, want), qt.name
            checked += 1
    assert checked >= 16


def _teacher_forced_logits(out) -> np.ndarray:
    from dualbrain.runtime.generate import decode_one
    from dualbrain.runtime.model import Model

    model = Model.load(out)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, POSITIONS).tolist()
    state = model.new_state(1)
    logits = [model.forward(np.array([ids[:PREFILL]]), state, all_logits=True)[0]]
    for t in ids[PREFILL:]:
        logits.append(decode_one(model, state, np.array([t]))[:, None][0])
    return np.concatenate(logits, 0).astype(np.float32)


def test_int4_export_runs_on_onnxruntime_close_to_fp16(int4, fp16):
    a, b = _teacher_forced_logits(fp16), _teacher_forced_logits(int4)
    assert a.shape == b.shape == (POSITIONS, a.shape[1]) and np.all(np.isfinite(b))
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    print(f"int4 vs fp16 export: top-1 agreement {agree:.3f} over {POSITIONS} positions, logit corr {corr:.4f}")
    # a tiny random model quantizes badly (no outliers to protect, flat logits); chance is 1/vocab
    assert agree >= 0.4 and corr >= 0.9


def test_quant_refusals(ckpt, tmp_path):
    from click.testing import CliRunner

    from dualbrain.cli import main
    from dualbrain.exporter.export import export_checkpoint

    with pytest.raises(DualbrainError, match="needs --dtype float16 or bfloat16"):
        export_checkpoint(ckpt, tmp_path / "a", dtype="float32", quant=INT4_WEIGHT_ONLY)
    with pytest.raises(DualbrainError, match="unknown quantization 'fp8'"):
        export_checkpoint(ckpt, tmp_path / "a", dtype="float16", quant="fp8")
    res = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--quant", "int4-weight-only"])
    assert res.exit_code == 2 and "needs --dtype float16 or bfloat16" in res.output
    res = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--quant", "fp8"])
    assert res.exit_code == 2 and "fp8" in res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_manifest_quant_field_is_optional_and_checked(int4, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(int4, d)
    j = json.loads((d / "manifest.json").read_text())
    del j["quant"]                                      # a manifest from before quantized exports
    (d / "manifest.json").write_text(json.dumps(j))
    assert load_manifest(d).quant is None
    j["quant"] = "int3"
    (d / "manifest.json").write_text(json.dumps(j))
    with pytest.raises(DualbrainError, match="unknown quant 'int3'"):
        load_manifest(d)


def test_recipe_precision_check():
    int4r, fp16r, fp8r = load_recipe("rtx5090-int4"), load_recipe("rtx4090-fp16"), load_recipe("h100-fp8")
    int4r.check_precision("float16", INT4_WEIGHT_ONLY)
    int4r.check_precision("bfloat16", INT4_WEIGHT_ONLY)
    with pytest.raises(DualbrainError, match="this export is float16 \\(export again with .*--quant int4"):
        int4r.check_precision("float16")
    with pytest.raises(DualbrainError, match="this export is float32 \\+ int4-weight-only"):
        int4r.check_precision("float32", INT4_WEIGHT_ONLY)
    with pytest.raises(DualbrainError, match="expects an unquantized float16 export"):
        fp16r.check_precision("float16", INT4_WEIGHT_ONLY)
    fp16r.check_precision("float16")
    with pytest.raises(DualbrainError, match="does not support yet"):
        fp8r.check_precision("bfloat16", INT4_WEIGHT_ONLY)


# --- TensorRT-RTX -------------------------------------------------------------------------------------

def test_tensorrt_rtx_builds_the_int4_recipe(int4, fp16, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from dualbrain.recipes.build import build

    man = build(int4, "rtx5090-int4", tmp_path / "engines")
    exp = load_manifest(int4)
    assert [b["name"] for b in man["blocks"]] == [b.name for b in exp.blocks]
    assert all(b["size"] > 0 for b in man["blocks"])
    assert man["compute_capabilities"] == ["12.0"] and man["export"]["dtype"] == "float16"
    kinds = {b["name"]: {p["plugin"] for p in b["plugins"]} for b in man["blocks"]}
    assert {"CausalConv1d", "GatedDeltaRule"} <= kinds["layer_000"]
    with pytest.raises(DualbrainError, match="expects an unquantized bfloat16 export"):
        build(int4, "rtx5090-bf16", tmp_path / "e2")
    with pytest.raises(DualbrainError, match="--quant int4-weight-only"):
        build(fp16, "rtx5090-int4", tmp_path / "e3")
