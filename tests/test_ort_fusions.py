"""The load-time fusions of runtime/backends/ort_fusions.py: the fused graph computes what the numpy
formula does (and what the unfused graph does), on random inputs; near misses are left alone. The
exports' own norms are covered end to end by the parity tests (transformers against the fused graphs)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dualbrain.runtime.backends.ort_fusions import fuse_rms_norm

H = 48
EPS = 1e-6


def _norm_model(*, weight: str | None = "one_plus", axes=(-1,), exponent: float = 2.0, expose: str | None = None,
                constants: str = "nodes", reduce: str = "ReduceMean", square: str = "Pow"):
    """y = x * 1/sqrt(mean(x^2, axes) + eps) [* w | * (1 + w)] (`reduce` ReduceSum: the l2norm's sum), in the
    nodes the exporter's trace has; x^2 as Pow(x, exponent) or Mul(x, x). `expose`: an intermediate value
    also made a graph output (a second reader)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(H).astype(np.float32)
    consts = {"two": np.array(exponent, np.float32), "axes": np.array(axes, np.int64),
              "eps": np.array(EPS, np.float32), "one": np.array(1.0, np.float32)}
    nodes, inits = [], [numpy_helper.from_array(w, "w")]
    for name, value in consts.items():
        if constants == "nodes":          # what the exporter's trace has
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        elif constants == "lists":        # Constant's value_float / value_ints forms
            attr = {"value_float": float(value)} if value.dtype == np.float32 else {"value_ints": value.tolist()}
            nodes.append(helper.make_node("Constant", [], [name], **attr))
        else:
            inits.append(numpy_helper.from_array(value, name))
    squared = helper.make_node(square, ["x", "two" if square == "Pow" else "x"], ["sq"])
    nodes += [squared,
              helper.make_node(reduce, ["sq", "axes"], ["mean"], keepdims=1),
              helper.make_node("Add", ["mean", "eps"], ["var"]),
              helper.make_node("Sqrt", ["var"], ["root"]),
              helper.make_node("Reciprocal", ["root"], ["rsqrt"]),
              helper.make_node("Mul", ["x", "rsqrt"], ["normed" if weight else "y"])]
    if weight == "one_plus":
        nodes += [helper.make_node("Add", ["one", "w"], ["scale"]), helper.make_node("Mul", ["normed", "scale"], ["y"])]
    elif weight == "plain":
        nodes += [helper.make_node("Mul", ["w", "normed"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if expose:
        outputs.append(helper.make_tensor_value_info(expose, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", H])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), w


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("weight,reduce,square", [("one_plus", "ReduceMean", "Pow"), ("plain", "ReduceMean", "Mul"),
                                                  (None, "ReduceMean", "Pow"), (None, "ReduceSum", "Mul")])
@pytest.mark.parametrize("constants", ["nodes", "lists", "initializers"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7)])
def test_rms_norm_chain_becomes_one_node_with_the_same_result(weight, reduce, square, constants, shape):
    model, w = _norm_model(weight=weight, constants=constants, reduce=reduce, square=square)
    x = (np.random.default_rng(sum(shape)).standard_normal((*shape, H)) * 3).astype(np.float32)
    before = _run(model, x)[0]
    assert fuse_rms_norm(model) == 1
    ops = [n.op_type for n in model.graph.node if n.op_type != "Constant"]
    assert "SimplifiedLayerNormalization" in ops
    assert not {"Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal"} & set(ops)
    assert ops.count("Mul") == 0
    after = _run(model, x)[0]
    scale = {"one_plus": 1 + w, "plain": w, None: 1.0}[weight]
    stat = np.mean if reduce == "ReduceMean" else np.sum
    want = x / np.sqrt(stat(x.astype(np.float64) ** 2, -1, keepdims=True) + EPS) * scale
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("near_miss", [dict(axes=(1,)), dict(exponent=3.0), dict(expose="rsqrt"), dict(expose="mean"),
                                       dict(reduce="ReduceMax")])
def test_near_misses_are_left_alone(near_miss):
    model, _ = _norm_model(**near_miss)
    nodes = len(model.graph.node)
    assert fuse_rms_norm(model) == 0
    assert len(model.graph.node) == nodes


@pytest.mark.parametrize("case", [dict(expose="normed"), dict(reduce="ReduceSum")])
def test_weight_mul_stays_outside(case):
    """The normalised value read twice, or an l2norm (its scale is 1 / sqrt(D)): the chain fuses, the
    weight's Mul stays a Mul on its output."""
    model, w = _norm_model(weight="plain", **case)
    x = np.random.default_rng(5).standard_normal((2, 3, H)).astype(np.float32)
    before = _run(model, x)
    assert fuse_rms_norm(model) == 1
    assert [n.op_type for n in model.graph.node if n.op_type != "Constant"] == ["SimplifiedLayerNormalization", "Mul"]
    for got, want in zip(_run(model, x), before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_norm_of_an_export_is_fused(artifacts, dtype):
    """The exporter's own trace: each layer's input and post-attention norms, the GDN gated norm and q/k
    l2norms or the attention's q/k norms, and the final norm all match (a change in the trace would
    silently undo the fusion)."""
    import onnx

    from dualbrain.runtime.manifest import load_manifest
    from dualbrain.runtime.spec import FULL

    out = artifacts.export(artifacts.checkpoint("moe"), dtype=dtype)
    man = load_manifest(out)
    model = onnx.load(str(out / man.linked), load_external_data=False)
    full = sum(t == FULL for t in man.model.layer_types)
    want = 2 * len(man.layers) + 3 * (len(man.layers) - full) + 2 * full + 1
    assert fuse_rms_norm(model) == want
    assert not [n for n in model.graph.node if n.op_type in ("Pow", "ReduceMean", "ReduceSum", "Sqrt")]
