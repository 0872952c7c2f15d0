"""dualbrain::MoEDispatch: numpy reference vs transformers' Qwen3.5-MoE block, torch eager vs
reference, and the dynamo-exported single-node graph run by ONNX Runtime (both function bodies)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

from dualbrain.plugins.moe_dispatch import function as mfn
from dualbrain.plugins.moe_dispatch import reference as ref

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from dualbrain.plugins.moe_dispatch import op as mop  # noqa: E402

H, I = 64, 32
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=1e-2, atol=2e-3)}
BODIES = ("contrib", "standard")


def _routing_gap_ok(logits, k):
    """True when no probability tie straddles the top-k boundary (tie order is implementation-defined)."""
    p = np.sort(ref.route(logits, logits.shape[1])[0], axis=-1)[:, ::-1]  # full softmax, sorted
    return k == logits.shape[1] or bool(np.all(p[:, k - 1] - p[:, k] > 1e-6))


def _weights(E, dtype, seed):
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((E, H)) * 0.15).astype(dtype)
    fc1 = (rng.standard_normal((E, 2 * I, H)) / np.sqrt(H)).astype(dtype)
    fc2 = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(dtype)
    return gate, fc1, fc2


def _tokens(N, gate, k, dtype, seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        x = rng.standard_normal((N, H)).astype(dtype)
        logits = (x.astype(np.float32) @ gate.astype(np.float32).T).astype(dtype)
        if _routing_gap_ok(logits, k):
            return x, logits
    raise AssertionError("could not draw tie-free routing")


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    t = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=t["rtol"], atol=t["atol"] * max(1.0, np.abs(want).max()))


# ----------------------------------------------------------------------------- layout helpers
def test_interleave_roundtrip_numpy_and_torch():
    gu = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3, 8, 5)
    il = ref.interleave_gate_up(gu)
    np.testing.assert_array_equal(il[:, 0::2], gu[:, :4])
    np.testing.assert_array_equal(il[:, 1::2], gu[:, 4:])
    np.testing.assert_array_equal(ref.deinterleave_gate_up(il), gu)
    t = torch.from_numpy(gu)
    np.testing.assert_array_equal(mop.interleave_gate_up(t).numpy(), il)
    np.testing.assert_array_equal(mop.deinterleave_gate_up(mop.interleave_gate_up(t)).numpy(), gu)


# ----------------------------------------------------------------------------- vs transformers
def _hf_block(E, k, dtype):
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                               num_experts=E, num_experts_per_tok=k, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    blk = Qwen3_5MoeSparseMoeBlock(cfg).eval()
    g = torch.Generator().manual_seed(E * 100 + k)
    with torch.no_grad():
        blk.gate.weight.copy_(torch.randn(E, H, generator=g) * 0.15)
        blk.experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5)
        blk.experts.down_proj.copy_(torch.randn(E, H, I, generator=g) / I ** 0.5)
        for p in blk.shared_expert.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        blk.shared_expert.down_proj.weight.zero_()  # shared expert contributes exactly 0
        blk.shared_expert_gate.weight.copy_(torch.randn(1, H, generator=g) * 0.1)
    return blk.to(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 4)])
def test_reference_matches_transformers(E, k, dtype):
    tdt = torch.float32 if dtype == np.float32 else torch.float16
    blk = _hf_block(E, k, tdt)
    gate = blk.gate.weight.detach().numpy()
    fc1 = ref.interleave_gate_up(blk.experts.gate_up_proj.detach().numpy())
    fc2 = blk.experts.down_proj.detach().numpy()
    for N in (1, 3, 17):
        x, _ = _tokens(N, gate, k, dtype, seed=N)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            logits, w, idx = blk.gate(xt)
            hf_routed = blk.experts(xt, idx, w).numpy()
            hf_block = blk(xt[None])[0].numpy()  # shared expert zeroed
        want = ref.moe_dispatch(x, logits.numpy(), fc1, fc2, k, normalize=True)
        assert want.dtype == dtype
        _close(want, hf_routed, dtype)
        _close(want, hf_block, dtype)
        rw, ri = ref.route(logits.numpy(), k)
        np.testing.assert_array_equal(np.sort(ri, -1), np.sort(idx.numpy(), -1))
        np.testing.assert_allclose(rw.sum(-1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- torch eager
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("E,k,normalize", [(8, 2, True), (16, 4, True), (16, 4, False), (8, 8, True)])
def test_torch_eager_matches_reference(E, k, normalize, dtype):
    gate, fc1, fc2 = _weights(E, dtype, seed=E + k)
    for N in (1, 3, 17):
        x, logits = _tokens(N, gate, k, dtype, seed=100 + N)
        got = mop.moe_dispatch(torch.from_numpy(x), torch.from_numpy(logits), torch.from_numpy(fc1),
                               torch.from_numpy(fc2), k, normalize)
        assert got.dtype == torch.from_numpy(x).dtype and tuple(got.shape) == (N, H)
        _close(got.numpy(), ref.moe_dispatch(x, logits, fc1, fc2, k, normalize), dtype)


def test_normalize_false_differs():
    gate, fc1, fc2 = _weights(8, np.float32, 0)
    x, logits = _tokens(5, gate, 2, np.float32, 0)
    a = ref.moe_dispatch(x, logits, fc1, fc2, 2, True)
    b = ref.moe_dispatch(x, logits, fc1, fc2, 2, False)
    assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------- export + ORT
class _Tiny(torch.nn.Module):
    def __init__(self, E, k, normalize, dtype):
        super().__init__()
        gate, fc1, fc2 = _weights(E, dtype, seed=7 * E + k)
        self.gate = torch.nn.Parameter(torch.from_numpy(gate))
        self.fc1 = torch.nn.Parameter(torch.from_numpy(fc1))
        self.register_buffer("fc2", torch.from_numpy(fc2))
        self.k, self.normalize = k, normalize

    def forward(self, x):
        return mop.moe_dispatch(x, x @ self.gate.T, self.fc1, self.fc2, self.k, self.normalize)


_EXPORTS = {}


def _exported(E, k, normalize, dtype):
    key = (E, k, normalize, dtype)
    if key not in _EXPORTS:
        mod = _Tiny(E, k, normalize, dtype).eval()
        x = torch.from_numpy(np.zeros((5, H), dtype))
        prog = torch.onnx.export(mod, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("N")},),
                                 verbose=False)
        _EXPORTS[key] = (mod, prog.model_proto)
    return _EXPORTS[key]


@pytest.mark.parametrize("E,k,normalize,dtype", [(8, 2, True, np.float32), (16, 4, True, np.float32),
                                                 (16, 4, False, np.float32), (16, 4, True, np.float16)])
def test_export_single_node_and_ort(E, k, normalize, dtype):
    mod, model = _exported(E, k, normalize, dtype)
    nodes = [n for n in model.graph.node if n.domain == ref.DOMAIN]
    assert len(nodes) == 1 and nodes[0].op_type == ref.OP_TYPE
    assert not any(n.op_type in ("TopK", "Softmax", "Loop", "If") for n in model.graph.node)
    attrs = {a.name: oh.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"top_k": k, "normalize": int(normalize)}
    inits = {i.name for i in model.graph.initializer}
    assert {"fc1", "fc2"} <= inits and [i.name for i in model.graph.input] == ["x"]
    assert nodes[0].input[2] == "fc1" and nodes[0].input[3] == "fc2"
    in_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert in_dim.dim_param and not in_dim.HasField("dim_value")

    gate = mod.gate.detach().numpy()
    fc1, fc2 = mod.fc1.detach().numpy(), mod.fc2.numpy()
    for body in BODIES:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        mfn.add_functions_to_model(m, body)
        onnx.checker.check_model(m)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for N in (1, 3, 17, 64):
            x, logits = _tokens(N, gate, k, dtype, seed=1000 + N)
            (y,) = sess.run(None, {"x": x})
            assert y.dtype == dtype and y.shape == (N, H)
            _close(y, ref.moe_dispatch(x, logits, fc1, fc2, k, normalize), dtype)


# ----------------------------------------------------------------------------- function proto itself
@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_function_one_proto_many_topk_and_default_normalize(body, dtype):
    """One FunctionProto serves nodes with different top_k; normalize defaults to 1."""
    E, opset = 16, 21
    et = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    ins = ["x", "logits", "fc1", "fc2"]
    nodes = [
        oh.make_node(ref.OP_TYPE, ins, ["y2"], domain=ref.DOMAIN, top_k=2),        # normalize default
        oh.make_node(ref.OP_TYPE, ins, ["y4"], domain=ref.DOMAIN, top_k=4, normalize=0),
        oh.make_node(ref.OP_TYPE, ins, ["y16"], domain=ref.DOMAIN, top_k=E, normalize=1),
    ]
    vi = lambda n, s: oh.make_tensor_value_info(n, et, s)  # noqa: E731
    graph = oh.make_graph(nodes, "g", [vi("x", ["N", H]), vi("logits", ["N", E]), vi("fc1", [E, 2 * I, H]),
                                       vi("fc2", [E, H, I])],
                          [vi("y2", ["N", H]), vi("y4", ["N", H]), vi("y16", ["N", H])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    mfn.add_functions_to_model(model, body)
    mfn.add_functions_to_model(model, body)  # idempotent
    assert len(model.functions) == 1
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gate, fc1, fc2 = _weights(E, dtype, seed=3)
    for N in (1, 17):
        x, logits = _tokens(N, gate, 4, dtype, seed=N)
        y2, y4, y16 = sess.run(None, {"x": x, "logits": logits, "fc1": fc1, "fc2": fc2})
        _close(y2, ref.moe_dispatch(x, logits, fc1, fc2, 2, True), dtype)
        _close(y4, ref.moe_dispatch(x, logits, fc1, fc2, 4, False), dtype)
        _close(y16, ref.moe_dispatch(x, logits, fc1, fc2, E, True), dtype)


def test_function_opset_guard():
    with pytest.raises(ValueError):
        mfn.onnx_functions(12)
    with pytest.raises(ValueError):
        mfn.onnx_functions(18, body="nope")
    (fn,) = mfn.onnx_functions(18)
    assert (fn.domain, fn.name) == ("dualbrain", "MoEDispatch")
    assert list(fn.attribute) == ["top_k"] and [a.name for a in fn.attribute_proto] == ["normalize"]
    assert {o.domain: o.version for o in fn.opset_import}[""] == 18
