"""dualbrain's own CPU kernels for ONNX Runtime (runtime/backends/ort_kernels.py, plugins/*/cpu.c).

The float32 MoE and causal-conv kernels and the int8 linear kernel are checked against their numpy
references on random inputs and odd shapes, through a session that loads the built library; the MoE
and int8 rewrites are checked on both sides of their token limit (our kernel, ONNX Runtime's), with
ONNX Runtime's profile showing which one ran; a whole tiny-MoE export gives the same tokens and logits
with and without the kernels.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dualbrain.exporter.quantize import dequantize_blockwise, pack_int4, quantize_blockwise
from dualbrain.plugins.cached_attention import reference as attention_ref
from dualbrain.plugins.int4_matmul import reference as int4_ref
from dualbrain.plugins.int8_matmul import reference as int8_ref
from dualbrain.plugins.moe_dispatch import reference as moe_ref
from dualbrain.plugins.moe_dispatch.function import add_functions_to_model
from dualbrain.plugins.causal_conv import reference as conv_ref
from dualbrain.plugins.causal_conv.function import onnx_functions as conv_functions
from dualbrain.plugins.gated_delta import reference as gdn_ref
from dualbrain.plugins.gated_delta.function import onnx_functions as gdn_functions
from dualbrain.plugins.moe_dispatch.reference import DOMAIN, OP_TYPE
from dualbrain.runtime.backends import ort_kernels
from dualbrain.runtime.backends.ort_kernels import CPU_DOMAIN, KERNEL_MAX_TOKENS, use_cpu_kernels
from dualbrain.runtime.backends.ort_quant import QMOE_SWIGLU

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the kernels are off and ONNX Runtime's run instead")


@pytest.fixture(scope="module")
def library() -> Path:
    lib = ort_kernels.library()
    assert lib is not None and lib.is_file(), "the CPU kernels did not build"
    return lib


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory) -> Path:
    """The kernels as ort_kernels builds them where -march=native does not build (its last ARCH_FLAGS): with the
    compiler's default vector units, so the plain C paths run (quant_blocks.h's dot among them), which a CPU with
    AVX-512 never runs otherwise."""
    out = tmp_path_factory.mktemp("portable") / "libdualbrain_cpu_portable.so"
    built = ort_kernels.compile_library(ort_kernels.compiler(), out, ort_kernels.ARCH_FLAGS[-1])
    assert built.returncode == 0, built.stderr
    return out


def _moe_model(fc1, fc2, *, top_k, normalize=None, domain=CPU_DOMAIN):
    h, e = fc1.shape[2], fc1.shape[0]
    attrs = {"top_k": top_k} | ({} if normalize is None else {"normalize": normalize})
    node = helper.make_node(OP_TYPE, ["x", "logits", "fc1", "fc2"], ["y"], name="moe", domain=domain, **attrs)
    dt = helper.np_dtype_to_tensor_dtype(fc1.dtype)
    graph = helper.make_graph(
        [node], "moe", [helper.make_tensor_value_info("x", dt, ["N", h]),
                        helper.make_tensor_value_info("logits", dt, ["N", e])],
        [helper.make_tensor_value_info("y", dt, ["N", h])],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    if domain == DOMAIN:
        add_functions_to_model(model)
    return model


def _session(model, library, profile: str | None = None, supplied: dict | None = None):
    """A session over `model` with the kernels loaded; `supplied` (use_cpu_kernels' arrays) handed over as
    the backend does, as OrtValues the session keeps alive."""
    opts = ort.SessionOptions()
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in (supplied or {}).items()}
    for name, value in values.items():
        opts.add_initializer(name, value)
    opts.intra_op_num_threads = 2
    opts.register_custom_ops_library(str(library))
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.supplied_values = values     # ONNX Runtime reads them in place: they live as the session does
    return sess


def _weights(rng, e, i, h):
    return ((rng.standard_normal((e, 2 * i, h)) * 0.1).astype(np.float32),
            (rng.standard_normal((e, h, i)) * 0.1).astype(np.float32))


@pytest.mark.parametrize("n,h,e,i,k,normalize", [
    (1, 1024, 64, 256, 8, 1),      # the mid-size MoE's decode step
    (8, 1024, 64, 256, 8, 1),      # batch 8: experts shared between tokens
    (3, 37, 7, 13, 3, 0),          # nothing a multiple of 8; the full-softmax weights
    (5, 64, 4, 8, 4, None),        # every expert chosen; normalize left to the op's default
    (33, 24, 5, 9, 1, 1),          # top-1; more tokens than the kernel's limit (the op itself has none)
    (2, 16, 3, 1, 2, 1),           # an expert width of 1
])
def test_moe_kernel_matches_the_reference(library, n, h, e, i, k, normalize):
    rng = np.random.default_rng(n * 1000 + h)
    fc1, fc2 = _weights(rng, e, i, h)
    x = rng.standard_normal((n, h)).astype(np.float32)
    logits = rng.standard_normal((n, e)).astype(np.float32)
    y = _session(_moe_model(fc1, fc2, top_k=k, normalize=normalize), library).run(None, {"x": x, "logits": logits})[0]
    ref = moe_ref.moe_dispatch(x, logits, fc1, fc2, k, normalize is None or bool(normalize))
    assert y.shape == (n, h) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-6 * np.abs(ref).max())


def test_moe_kernel_breaks_ties_towards_the_lower_expert(library):
    rng = np.random.default_rng(7)
    fc1, fc2 = _weights(rng, 6, 8, 16)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    logits = np.array([[1, 2, 2, 2, 0, 2], [0, 0, 0, 0, 0, 0], [3, 3, 1, 1, 3, 2], [5, 1, 5, 1, 5, 1]], np.float32)
    y = _session(_moe_model(fc1, fc2, top_k=2), library).run(None, {"x": x, "logits": logits})[0]
    np.testing.assert_allclose(y, moe_ref.moe_dispatch(x, logits, fc1, fc2, 2), rtol=2e-5, atol=1e-6)


def test_moe_kernel_with_no_tokens(library):
    fc1, fc2 = _weights(np.random.default_rng(0), 4, 8, 16)
    y = _session(_moe_model(fc1, fc2, top_k=2), library).run(
        None, {"x": np.zeros((0, 16), np.float32), "logits": np.zeros((0, 4), np.float32)})[0]
    assert y.shape == (0, 16)


@pytest.mark.parametrize("fault,message", [
    ("fc1", "fc1 [E, 2I, H]"),        # fc1's hidden size differs from x's
    ("top_k", "top_k must be in 1..E"),
])
def test_moe_kernel_refuses_bad_shapes_and_attributes(library, fault, message):
    rng = np.random.default_rng(1)
    fc1, fc2 = _weights(rng, 4, 8, 16)
    if fault == "fc1":
        fc1 = np.ascontiguousarray(fc1[:, :, :12])
    model = _moe_model(fc1, fc2, top_k=5 if fault == "top_k" else 2)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 16
    with pytest.raises(Exception, match="MoEDispatch \\(cpu\\)") as info:
        _session(model, library).run(None, {"x": rng.standard_normal((2, 16)).astype(np.float32),
                                            "logits": rng.standard_normal((2, 4)).astype(np.float32)})
    assert message in str(info.value)


def _conv_model(weight, *, domain=CPU_DOMAIN, window=False):
    c, k = weight.shape
    op = conv_ref.OP_TYPE_WINDOW if window else conv_ref.OP_TYPE
    outs = ["y", "new_state"] + (["states"] if window else [])
    node = helper.make_node(op, ["x", "weight", "state"], outs, name="conv", domain=domain, channels=c)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", c]),
                         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["B", c, k - 1])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        [numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    if domain == conv_ref.DOMAIN:
        model.functions.extend(conv_functions(21))
    return model


@pytest.mark.parametrize("b,t,c,k", [
    (1, 1, 2048, 4),     # the mid-size MoE's decode step
    (8, 1, 2048, 4),     # batch 8
    (2, 70, 37, 4),      # a prefill longer than one parallel chunk; C not a multiple of 8
    (3, 2, 5, 3),        # fewer new positions than the state holds
    (2, 0, 6, 4),        # no new positions: the state passes through
])
def test_causal_conv_kernel_matches_the_reference(library, b, t, c, k):
    rng = np.random.default_rng(b * 100 + t)
    weight = rng.standard_normal((c, k)).astype(np.float32)
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    state = rng.standard_normal((b, c, k - 1)).astype(np.float32)
    y, new_state = _session(_conv_model(weight), library).run(None, {"x": x, "state": state})
    ref_y, ref_state = conv_ref.causal_conv1d(x, weight, state)
    assert y.shape == (b, t, c) and new_state.shape == (b, c, k - 1)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_state, ref_state)


def test_causal_conv_rewrite_leaves_the_window_variant(library):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((12, 4)).astype(np.float32)
    model = _conv_model(weight, domain=conv_ref.DOMAIN)
    assert use_cpu_kernels(model) == 1 and model.graph.node[0].domain == CPU_DOMAIN
    x, state = rng.standard_normal((2, 3, 12)).astype(np.float32), rng.standard_normal((2, 12, 3)).astype(np.float32)
    for got, want in zip(_session(model, library).run(None, {"x": x, "state": state}),
                         conv_ref.causal_conv1d(x, weight, state)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert use_cpu_kernels(_conv_model(weight, domain=conv_ref.DOMAIN, window=True)) == 0


GDN_INPUTS = ("q", "k", "v", "g", "beta", "state")


def _gdn_model(hk, hv, dk, dv, *, domain=CPU_DOMAIN, window=False, dtype=TensorProto.FLOAT):
    op = gdn_ref.OP_TYPE_WINDOW if window else gdn_ref.OP_TYPE
    outs = ["o", "new_state"] + (["states"] if window else [])
    node = helper.make_node(op, list(GDN_INPUTS), outs, name="gdn", domain=domain, num_k_heads=hk, num_v_heads=hv)
    shapes = {"q": ["B", "T", hk, dk], "k": ["B", "T", hk, dk], "v": ["B", "T", hv, dv], "g": ["B", "T", hv],
              "beta": ["B", "T", hv], "state": ["B", hv, dk, dv]}
    graph = helper.make_graph([node], "gdn", [helper.make_tensor_value_info(n, dtype, shapes[n]) for n in GDN_INPUTS],
                              [helper.make_tensor_value_info(o, dtype, None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    if domain == gdn_ref.DOMAIN:
        model.functions.extend(gdn_functions(21))
    return model


@pytest.mark.parametrize("b,t,hk,hv,dk,dv", [
    (1, 1, 8, 16, 64, 64),     # the mid-size MoE's decode step
    (8, 1, 8, 16, 64, 64),     # batch 8
    (2, 37, 2, 6, 16, 24),     # a prefill; three value heads per q/k head; dv not a multiple of 8
    (3, 5, 3, 3, 7, 5),        # odd head sizes, one value head per q/k head
    (2, 0, 2, 4, 8, 8),        # no new positions: the state passes through
])
@pytest.mark.parametrize("window", [False, True])
def test_gated_delta_kernel_matches_the_reference(library, b, t, hk, hv, dk, dv, window):
    rng = np.random.default_rng(b * 1000 + t * 10 + window)
    feeds = dict(zip(GDN_INPUTS, gdn_ref.random_inputs(rng, b, t, hk, hv, dk, dv)))
    got = _session(_gdn_model(hk, hv, dk, dv, window=window), library).run(None, feeds)
    want = gdn_ref.gated_delta_rule(*feeds.values(), window=window)
    assert [x.shape for x in got] == [x.shape for x in want]
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)


def test_gated_delta_kernel_refuses_bad_shapes(library):
    rng = np.random.default_rng(1)
    feeds = dict(zip(GDN_INPUTS, gdn_ref.random_inputs(rng, 1, 2, 2, 4, 8, 8)))
    feeds["state"] = feeds["state"][:, :3]        # 3 value heads in the state, 4 in v
    model = _gdn_model(2, 4, 8, 8)
    model.graph.input[5].type.tensor_type.ClearField("shape")      # so that the kernel sees it
    with pytest.raises(Exception, match="GatedDeltaRule \\(cpu\\): shapes must be"):
        _session(model, library).run(None, feeds)


def test_gated_delta_rewrite_runs_ours_for_both_forms_and_leaves_other_dtypes(library, tmp_path):
    rng = np.random.default_rng(3)
    feeds = dict(zip(GDN_INPUTS, gdn_ref.random_inputs(rng, 2, 3, 2, 4, 8, 8)))
    for window in (False, True):
        model = _gdn_model(2, 4, 8, 8, domain=gdn_ref.DOMAIN, window=window)
        before = _session(model, library).run(None, feeds)          # ONNX Runtime: LinearAttention / Loop
        assert use_cpu_kernels(model) == 1 and model.graph.node[0].domain == CPU_DOMAIN
        sess = _session(model, library, profile=str(tmp_path / f"p{window}"))
        for x, y in zip(sess.run(None, feeds), before):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)
        assert _ran(sess.end_profiling()) == {"gdn"}
    assert use_cpu_kernels(_gdn_model(2, 4, 8, 8, domain=gdn_ref.DOMAIN, dtype=TensorProto.FLOAT16)) == 0


MIXER_INPUTS = ("qkv", "conv_weight_t", "conv_state", "z", "g", "beta", "state", "q_scale", "k_scale", "norm", "eps")


def _mixer_model(hk, raw_gates=False):
    inputs = list(MIXER_INPUTS) + (["gate_params"] if raw_gates else [])
    op = gdn_ref.MIXER_RAW_OP_TYPE if raw_gates else gdn_ref.MIXER_OP_TYPE
    node = helper.make_node(op, inputs, ["y", "new_conv_state", "new_state"], name="mixer", domain=CPU_DOMAIN,
                            num_k_heads=hk)
    graph = helper.make_graph([node], "mixer", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                for n in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CPU_DOMAIN, 1)])


def _mixer_inputs(rng, b, t, hk, hv, dk, dv, kw, raw_gates=False):
    """The mixer's inputs; with `raw_gates`, g and beta are the raw projections a and b (a wide enough to pass
    softplus' threshold of 20) and gate_params (dt_bias, A) is added."""
    c = 2 * hk * dk + hv * dv
    _, _, _, g, beta, state = gdn_ref.random_inputs(rng, b, t, hk, hv, dk, dv)
    if raw_gates:
        g = (rng.standard_normal((b, t, hv)) * 12).astype(np.float32)
        beta = rng.standard_normal((b, t, hv)).astype(np.float32)
    return {"qkv": rng.standard_normal((b, t, c)).astype(np.float32),
            "conv_weight_t": (rng.standard_normal((kw, c)) * 0.5).astype(np.float32),
            "conv_state": rng.standard_normal((b, c, kw - 1)).astype(np.float32),
            "z": (rng.standard_normal((b, t, hv * dv)) * 3).astype(np.float32),
            "g": g, "beta": beta, "state": state,
            "q_scale": rng.uniform(0.05, 0.3, dk).astype(np.float32),
            # |k| <= 1, as the exporter's l2norm makes it, so that the rule stays stable
            "k_scale": (rng.uniform(0.6, 1.0, dk) * dk ** -0.5).astype(np.float32),
            "norm": rng.uniform(-1.5, 1.5, dv).astype(np.float32),
            "eps": np.array([1e-6 / dk, 3e-3, 1e-6], np.float32)} | ({"gate_params": np.stack([
                rng.uniform(-3, 3, hv), rng.uniform(0.05, 1.0, hv)]).astype(np.float32)} if raw_gates else {})


@pytest.mark.parametrize("b,t,hk,hv,dk,dv,kw", [
    (1, 1, 8, 16, 64, 64, 4),     # the mid-size MoE's decode step
    (8, 1, 8, 16, 64, 64, 4),     # batch 8
    (2, 37, 2, 6, 16, 24, 4),     # a prefill; three value heads per q/k head; dv not a multiple of 8
    (3, 5, 3, 3, 7, 5, 2),        # odd head sizes, a two-tap conv
    (1, 2, 1, 2, 8, 8, 6),        # a conv longer than the call: the new conv state is part old, part new
    (2, 0, 2, 4, 8, 8, 4),        # no new positions: both states pass through
])
@pytest.mark.parametrize("raw_gates", [False, True])
def test_gated_delta_mixer_kernel_matches_the_reference(library, b, t, hk, hv, dk, dv, kw, raw_gates):
    rng = np.random.default_rng(b * 1000 + t * 10 + kw)
    feeds = _mixer_inputs(rng, b, t, hk, hv, dk, dv, kw, raw_gates)
    got = _session(_mixer_model(hk, raw_gates), library).run(None, feeds)
    params = feeds.pop("gate_params", None)
    want = gdn_ref.gated_delta_mixer(*feeds.values(), num_k_heads=hk, gate_params=params)
    shapes = [(b, t, hv, dv), (b, feeds["qkv"].shape[2], kw - 1), (b, hv, dk, dv)]
    assert [x.shape for x in got] == [x.shape for x in want] == shapes
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=3e-5)


def test_gated_delta_mixer_reference_is_the_exporters_mixer():
    """With ort_fusions' form of l2norm (scale dk ** -0.5, eps / dk) and q's dk ** -0.5 folded into its scale,
    the reference is conv, l2norm as the exporter writes it, the rule, and exporter.blocks.norms' gated norm
    (written out here in numpy)."""
    b, t, hk, hv, dk, dv, eps = 2, 6, 2, 4, 16, 8, 1e-6
    feeds = _mixer_inputs(np.random.default_rng(4), b, t, hk, hv, dk, dv, 4)
    feeds |= {"q_scale": np.full(dk, dk ** -1.0, np.float32), "k_scale": np.full(dk, dk ** -0.5, np.float32),
              "eps": np.array([1e-6 / dk, 1e-6 / dk, eps], np.float32)}
    y, conv_state = conv_ref.causal_conv1d(feeds["qkv"], feeds["conv_weight_t"].T, feeds["conv_state"])
    q, k, v = np.split(y.astype(np.float64), [hk * dk, 2 * hk * dk], axis=-1)
    q = gdn_ref.l2_normalise(q.reshape(b, t, hk, dk)) * dk ** -0.5
    k = gdn_ref.l2_normalise(k.reshape(b, t, hk, dk))
    o, state = gdn_ref.gated_delta_rule(q, k, v.reshape(b, t, hv, dv), feeds["g"], feeds["beta"], feeds["state"])
    o = o.astype(np.float64)
    z = feeds["z"].reshape(b, t, hv, dv).astype(np.float64)
    out = feeds["norm"] * (o / np.sqrt((o ** 2).mean(-1, keepdims=True) + eps)) * (z / (1 + np.exp(-z)))
    got = gdn_ref.gated_delta_mixer(*feeds.values(), num_k_heads=hk)
    np.testing.assert_array_equal(got[1], conv_state)
    for x, w in zip((got[0], got[2]), (out, state)):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-6)
    # the raw gates: exporter.blocks.layers' g = -exp(A_log) softplus(a + dt_bias) (torch's softplus, written out
    # here: log(1 + e^x), x itself past 20) and beta = sigmoid(b)
    rng = np.random.default_rng(5)
    a, b_raw = rng.standard_normal((b, t, hv)) * 12, rng.standard_normal((b, t, hv))
    dt_bias, a_log = rng.uniform(-3, 3, hv), rng.uniform(-5, 0, hv)
    x = a + dt_bias
    g = -np.exp(a_log) * np.where(x > 20, x, np.log(1 + np.exp(np.minimum(x, 20))))
    raw = feeds | {"g": a, "beta": b_raw}
    got = gdn_ref.gated_delta_mixer(*raw.values(), num_k_heads=hk, gate_params=np.stack([dt_bias, np.exp(a_log)]))
    want = gdn_ref.gated_delta_mixer(*(feeds | {"g": g, "beta": 1 / (1 + np.exp(-b_raw))}).values(), num_k_heads=hk)
    for x, w in zip(got, want):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dv", [64, 24])
def test_gated_delta_kernels_give_a_prompt_the_same_bits_at_once_or_token_by_token(library, dv):
    """The kernels read a call's first S from the input state, keep later ones in a buffer of their own and write
    the last straight to new_state (streamed where it can be), and the mixer runs a four-tap conv's one-position
    calls by a path of their own: a prompt fed in one call and fed a position a call must still agree to the bit,
    outputs and states (dv 64: the vector rule and conv paths; 24: the plain rule loop)."""
    b, t, hk, hv, dk, kw = 2, 5, 2, 4, 16, 4
    rng = np.random.default_rng(dv)
    gdn = dict(zip(GDN_INPUTS, gdn_ref.random_inputs(rng, b, t, hk, hv, dk, dv)))
    mixer = _mixer_inputs(rng, b, t, hk, hv, dk, dv, kw, raw_gates=True)
    per_position = {"q": 1, "k": 1, "v": 1, "g": 1, "beta": 1, "qkv": 1, "z": 1}
    carried = {"gdn": {"state": 1}, "mixer": {"conv_state": 1, "state": 2}}    # input -> the output that feeds it
    for name, sess, feeds in (("gdn", _session(_gdn_model(hk, hv, dk, dv), library), gdn),
                              ("mixer", _session(_mixer_model(hk, raw_gates=True), library), mixer)):
        at_once = sess.run(None, feeds)
        step = dict(feeds)
        outs = []
        for i in range(t):
            step |= {n: np.ascontiguousarray(feeds[n][:, i:i + 1]) for n in per_position if n in feeds}
            got = sess.run(None, step)
            outs.append(got[0])
            step |= {n: got[j] for n, j in carried[name].items()}
        np.testing.assert_array_equal(np.concatenate(outs, axis=1), at_once[0])
        for n, j in carried[name].items():
            np.testing.assert_array_equal(step[n], at_once[j])


def test_gated_delta_mixer_kernel_refuses_bad_shapes(library):
    feeds = _mixer_inputs(np.random.default_rng(1), 1, 2, 2, 4, 8, 8, 4)
    feeds["qkv"] = feeds["qkv"][..., :-1]               # one channel short of 2 Hk dk + Hv dv
    feeds["conv_weight_t"], feeds["conv_state"] = feeds["conv_weight_t"][:, :-1], feeds["conv_state"][:, :-1]
    with pytest.raises(Exception, match="GatedDeltaMixer \\(cpu\\): shapes must be"):
        _session(_mixer_model(2), library).run(None, feeds)


ATTENTION_INPUTS = ("q", "past_key", "new_key", "past_value", "new_value", "mask")


def _attention_inputs(rng, b, hq, hkv, s, p, d, padding=0):
    """Random q and K/V in the runtime's layout, and the exporter's mask (causal, each query sees itself) with
    the first `padding` slots of row 0 masked as left padding."""
    q = rng.standard_normal((b, hq, s, d)).astype(np.float32) * 2
    past_key, past_value = (rng.standard_normal((p, b, hkv, d)).astype(np.float32) for _ in range(2))
    new_key, new_value = (rng.standard_normal((s, b, hkv, d)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((s, p + s), bool), p)[None, None].repeat(b, 0)
    mask[0, :, :, :padding] = False
    mask[:, :, np.arange(s), p + np.arange(s)] = True
    return dict(zip(ATTENTION_INPUTS, (q, past_key, new_key, past_value, new_value, mask)))


def _cached_attention_model():
    inputs = [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "mask" else TensorProto.FLOAT, None)
              for n in (*ATTENTION_INPUTS, "scale")]
    node = helper.make_node(attention_ref.OP_TYPE, [i.name for i in inputs], ["o"], name="attention", domain=CPU_DOMAIN)
    graph = helper.make_graph([node], "attention", inputs,
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CPU_DOMAIN, 1)])


@pytest.mark.parametrize("b,hq,hkv,s,p,d,padding", [
    (1, 8, 2, 1, 63, 128, 0),       # the mid-size MoE's decode step
    (1, 16, 2, 1, 3000, 256, 5),    # the published geometry at a long context: the keys cut in parts
    (8, 8, 2, 1, 70, 128, 9),       # batch 8, row 0 left-padded
    (2, 6, 3, 5, 7, 24, 2),         # a speculative window; three query heads per K/V head; d not a multiple of 64
    (1, 4, 4, 37, 0, 72, 0),        # a prefill from nothing, one query head per K/V head, d = 64 + 8
    (3, 2, 1, 9, 4, 17, 3),         # odd sizes (d below 8 lanes after the first)
])
def test_cached_attention_kernel_matches_the_reference(library, b, hq, hkv, s, p, d, padding):
    rng = np.random.default_rng(b * 1000 + s * 10 + p)
    feeds = _attention_inputs(rng, b, hq, hkv, s, p, d, padding)
    scale = d ** -0.5 * 1.25
    got = _session(_cached_attention_model(), library).run(None, feeds | {"scale": np.array([scale], np.float32)})[0]
    want = attention_ref.cached_attention(*feeds.values(), scale)
    assert got.shape == want.shape == (b, hq, s, d)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cached_attention_kernel_gives_zeros_where_a_query_sees_no_key(library):
    feeds = _attention_inputs(np.random.default_rng(2), 2, 4, 2, 3, 100, 16)
    feeds["mask"][1, :, 1] = False                  # row 1's second query sees nothing (the exporter never does this)
    got = _session(_cached_attention_model(), library).run(None, feeds | {"scale": np.array([0.25], np.float32)})[0]
    want = attention_ref.cached_attention(*feeds.values(), 0.25)
    assert not got[1, :, 1].any() and not want[1, :, 1].any()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cached_attention_kernel_refuses_bad_shapes(library):
    feeds = _attention_inputs(np.random.default_rng(1), 1, 4, 2, 2, 5, 8)
    feeds["mask"] = feeds["mask"][..., :-1]         # one key short of past + new
    with pytest.raises(Exception, match="CachedAttention \\(cpu\\): shapes must be"):
        _session(_cached_attention_model(), library).run(None, feeds | {"scale": np.array([0.5], np.float32)})


def _exported_attention_model(d, *, scale=True, dtype=TensorProto.FLOAT):
    """The exporter's form: Attention over Transpose(Concat(past, new)) K and V (exporter.blocks.layers)."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "mask" else dtype, None)
              for n in ATTENTION_INPUTS]
    nodes = [helper.make_node("Concat", ["past_key", "new_key"], ["key_rows"], axis=0),
             helper.make_node("Transpose", ["key_rows"], ["key"], perm=[1, 2, 0, 3]),
             helper.make_node("Concat", ["past_value", "new_value"], ["value_rows"], axis=0),
             helper.make_node("Transpose", ["value_rows"], ["value"], perm=[1, 2, 0, 3]),
             helper.make_node("Attention", ["q", "key", "value", "mask"], ["o"], name="attention",
                              **({"scale": d ** -0.5 * 0.8} if scale else {}))]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("o", dtype, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("b,hq,hkv,s,p,d", [(1, 8, 2, 1, 40, 32), (2, 6, 3, 4, 9, 24), (1, 4, 2, 12, 0, 16)])
def test_attention_rewrite_matches_onnxruntimes_attention_and_the_split_form(library, tmp_path, b, hq, hkv, s, p, d):
    """ONNX Runtime's own Attention on the exported form is the independent reference; the backend's split form
    (what runs without the kernel) must agree too. The Concats and Transposes go with the rewrite."""
    from dualbrain.runtime.backends.onnxruntime import split_attention

    feeds = _attention_inputs(np.random.default_rng(s + p), b, hq, hkv, s, p, d, padding=1)
    theirs = _session(_exported_attention_model(d), library).run(None, feeds)[0]
    split = _exported_attention_model(d)
    assert split_attention(split) == 1
    model = _exported_attention_model(d)
    assert use_cpu_kernels(model) == 1
    assert [n.op_type for n in model.graph.node] == [attention_ref.OP_TYPE]
    sess = _session(model, library, profile=str(tmp_path / "p"))
    ours = sess.run(None, feeds)[0]
    assert _ran(sess.end_profiling()) == {model.graph.node[0].name}
    for other in (theirs, _session(split, library).run(None, feeds)[0]):
        np.testing.assert_allclose(ours, other, rtol=1e-4, atol=1e-5)


def test_attention_rewrite_leaves_other_forms_alone():
    assert use_cpu_kernels(_exported_attention_model(16, dtype=TensorProto.FLOAT16)) == 0   # not float32
    causal = _exported_attention_model(16)
    causal.graph.node[-1].attribute.append(helper.make_attribute("is_causal", 1))   # an attribute it does not take
    assert use_cpu_kernels(causal) == 0
    shared = _exported_attention_model(16)           # the concatenated keys also a graph output: they stay
    shared.graph.output.append(helper.make_tensor_value_info("key_rows", TensorProto.FLOAT, None))
    assert use_cpu_kernels(shared) == 1
    assert [n.op_type for n in shared.graph.node] == ["Concat", attention_ref.OP_TYPE]
    default = _exported_attention_model(16, scale=False)     # no scale and q's size unknown: left as it is
    assert use_cpu_kernels(default) == 0
    broadcast = _exported_attention_model(16)         # a mask ONNX broadcasts, (S, T): the kernel takes (B, 1, S, T)
    broadcast.graph.input[5].CopyFrom(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["S", "T"]))
    assert use_cpu_kernels(broadcast) == 0


def _linear_op_model(op_type, x_shape, weight, scales, **attrs):
    """One node of our linear kernel `op_type`: y = op(x, weight, scales)."""
    node = helper.make_node(op_type, ["x", "w", "s"], ["y"], domain=CPU_DOMAIN, **attrs)
    graph = helper.make_graph([node], "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scales, "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CPU_DOMAIN, 1)])


def _int8_weight(rng, k, n, block):
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    q, scale = quantize_blockwise(w, 0, block, 8, np.float32)
    return q, scale


@pytest.mark.parametrize("x_shape,n,block", [
    ((1, 1024), 37, 32),        # one token; N odd
    ((2, 1, 64), 300, 16),      # batch 2 decode step (rank 3)
    ((3, 5, 256), 20, 128),     # 15 tokens: passes of eight, four and three
    ((2, 2, 96), 8, 32),
])
def test_int8_matmul_kernel_matches_the_reference(library, x_shape, n, block):
    rng = np.random.default_rng(n + block)
    k = x_shape[-1]
    q, scale = _int8_weight(rng, k, n, block)
    b, scales = int8_ref.to_rows(q, scale, block)
    np.testing.assert_array_equal(int8_ref.int8_matmul(np.eye(k, dtype=np.float32), b, scales),
                                  dequantize_blockwise(q, scale, 0, block))      # the layout round-trips
    model = _linear_op_model(int8_ref.OP_TYPE, x_shape, b, scales, block_size=block)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = _session(model, library).run(None, {"x": x})[0]
    ref = int8_ref.int8_matmul(x, b, scales)
    assert y.shape == x_shape[:-1] + (n,)
    # int16 activations (one scale per token): within 2^-15 of each token's largest value, per weight
    bound = np.abs(dequantize_blockwise(q, scale, 0, block)).sum(0) * np.abs(x).max(-1, keepdims=True) / 32767
    assert (np.abs(y - ref) <= bound + 1e-6).all()


def test_int8_matmul_gives_a_token_the_same_bits_whatever_is_beside_it(library):
    """Int8MatMul widens a row's weights once for up to eight tokens (passes of eight, four and the rest): a
    token's output must not depend on how many tokens share its pass."""
    rng = np.random.default_rng(7)
    k, n, m = 256, 40, 15
    b, scales = int8_ref.to_rows(*_int8_weight(rng, k, n, 32), 32)
    sess = _session(_linear_op_model(int8_ref.OP_TYPE, [None, k], b, scales, block_size=32), library)
    x = rng.standard_normal((m, k)).astype(np.float32)
    together = sess.run(None, {"x": x})[0]
    for t in (0, 7, 8, 11, 12, 14):
        np.testing.assert_array_equal(sess.run(None, {"x": x[t:t + 1]})[0][0], together[t])
    np.testing.assert_array_equal(sess.run(None, {"x": x[3:8]})[0], together[3:8])     # five: four and one


def _linear_model(q, scale, block, tokens, *, zero_point=False, bits=8, gemm=None):
    """MatMul(x [1, tokens, K], DequantizeLinear(q, scale)) as the exporter writes a quantized linear; with
    `gemm` (its attributes), Gemm(x [tokens, K], ...) as it writes the MoE router and shared expert."""
    k, n = q.shape
    dq_in = ["q", "scale"] + (["zp"] if zero_point else [])
    linear = helper.make_node("MatMul", ["x", "w"], ["y"], name="lin") if gemm is None else \
        helper.make_node("Gemm", ["x", "w"], ["y"], name="lin", **gemm)
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["w"], name="lin.dequantize", axis=0, block_size=block),
             linear]
    stored = numpy_helper.from_array(q, "q") if bits == 8 else \
        helper.make_tensor("q", TensorProto.INT4, q.shape, pack_int4(q), raw=True)
    inits = [stored, numpy_helper.from_array(scale, "scale")]
    if zero_point:
        inits.append(numpy_helper.from_array(np.zeros_like(q[:k // block]), "zp"))
    lead = [1, tokens] if gemm is None else [tokens]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("tokens", [1, KERNEL_MAX_TOKENS, KERNEL_MAX_TOKENS + 9])
@pytest.mark.parametrize("supplied", [False, True])
def test_int8_linear_rewrite_runs_ours_for_decode_and_matmulnbits_for_prefill(library, tmp_path, tokens, supplied):
    rng = np.random.default_rng(tokens)
    k, n, block = 128, 48, 32
    q, scale = _int8_weight(rng, k, n, block)
    model = _linear_model(q, scale, block, tokens)
    arrays = {} if supplied else None
    assert use_cpu_kernels(model, tmp_path, arrays) == 1
    assert not any(nd.op_type == "DequantizeLinear" for nd in model.graph.node)     # moved into the prefill branch
    assert {t.name for t in model.graph.initializer}.isdisjoint({"q", "scale"})       # the export's copy is dropped
    assert arrays is None or len(arrays) == 2
    x = rng.standard_normal((1, tokens, k)).astype(np.float32)
    sess = _session(model, library, profile=str(tmp_path / "p"), supplied=arrays)
    y = sess.run(None, {"x": x})[0]
    exact = x @ dequantize_blockwise(q, scale, 0, block)
    ours = tokens <= KERNEL_MAX_TOKENS
    # ours: int16 activations; MatMulNBits: int8 activations (accuracy level 4)
    np.testing.assert_allclose(y, exact, atol=(2e-4 if ours else 2e-2) * np.abs(exact).max())
    ran = _ran(sess.end_profiling())
    assert any(name.endswith("cpu_kernel/int8") for name in ran) == ours, ran
    assert any(name.endswith("cpu_kernel/nbits") for name in ran) == (not ours), ran


def test_int8_linear_rewrite_leaves_other_weights_alone(tmp_path):
    rng = np.random.default_rng(2)
    q, scale = _int8_weight(rng, 64, 16, 32)
    assert use_cpu_kernels(_linear_model(q, scale, 32, 1, zero_point=True), tmp_path) == 0   # a zero point
    model = _linear_model(q, scale, 32, 1)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(q.astype(np.float32), "q"))  # not int8
    assert use_cpu_kernels(model, tmp_path) == 0
    assert use_cpu_kernels(_linear_model(q, scale, 32, 1, gemm={}), tmp_path) == 0        # a Gemm: left to ONNX Runtime


def _sibling_linears_model(weights, tokens, bits):
    """MatMul(x, DequantizeLinear(q_i, scale_i)) -> y_i for each (q, scale, block) of `weights` on one x [1, tokens,
    K], as the exporter writes a GDN layer's input projections; beside them, reading x too, a float MatMul and
    an int8/int4 Gemm (the MoE router's form), which stay out of the group."""
    k = weights[0][0].shape[0]
    nodes, inits, outs = [], [], []
    for i, (q, scale, block) in enumerate(weights):
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=0, block_size=block),
                  helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"lin{i}")]
        inits += [numpy_helper.from_array(q, f"q{i}") if bits == 8 else
                  helper.make_tensor(f"q{i}", TensorProto.INT4, q.shape, pack_int4(q), raw=True),
                  numpy_helper.from_array(scale, f"s{i}")]
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, tokens, q.shape[1]]))
    rng = np.random.default_rng(0)
    inits.append(numpy_helper.from_array(rng.standard_normal((k, 8)).astype(np.float32), "wf"))
    nodes += [helper.make_node("MatMul", ["x", "wf"], ["yf"], name="float"),
              helper.make_node("Reshape", ["x", "flat"], ["x2"]),
              helper.make_node("DequantizeLinear", ["q0", "s0"], ["wg"], axis=0, block_size=weights[0][2]),
              helper.make_node("Gemm", ["x2", "wg"], ["yg"], name="gemm")]
    inits.append(numpy_helper.from_array(np.array([-1, k], np.int64), "flat"))
    outs += [helper.make_tensor_value_info("yf", TensorProto.FLOAT, [1, tokens, 8]),
             helper.make_tensor_value_info("yg", TensorProto.FLOAT, [tokens, weights[0][0].shape[1]])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])
    graph = helper.make_graph(nodes, "siblings", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("bits,tokens", [(8, 1), (8, 3), (8, KERNEL_MAX_TOKENS + 5), (4, 1), (4, 9), (4, 70)])
def test_quantized_linears_of_one_input_run_as_one(library, tmp_path, bits, tokens):
    """A GDN layer's four input projections (one 16 wide, as its gates are) read one x: they become one kernel
    node over their weights side by side (int8: behind one If) and a Split. Each output is what that linear
    rewritten alone gives, bit for bit for our kernels (the same dot products) and within float32 rounding
    for MatMulNBits (prefill: its own tiling of the columns)."""
    if bits == 4 and not ort_kernels._has_vnni():
        pytest.skip("Int4MatMul is used only where the CPU has AVX-512 VNNI")
    rng = np.random.default_rng(bits * 100 + tokens)
    k = 128
    blocks = [32, 32, 32, 32] if bits == 8 else [32, 64, 128, 32]     # int4: a scale per 32 in the layout
    weights = []
    for n, block in zip([40, 16, 24, 16], blocks):
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        weights.append((*quantize_blockwise(w, 0, block, bits, np.float32), block))
    model = _sibling_linears_model(weights, tokens, bits)
    arrays = {}
    rewritten = use_cpu_kernels(model, tmp_path, arrays)
    assert rewritten == (2 if bits == 4 else 1)       # the group (and, at 4 bits, the Gemm on its own)
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("Split") == 1 and ops.count("MatMul") == 1          # the float MatMul stays
    if bits == 8:
        assert ops.count("If") == 1 and ops.count("Gemm") == 1            # int8's Gemm is left to ONNX Runtime
    else:
        assert ops.count(int4_ref.OP_TYPE) == 2 and "Gemm" not in ops     # the group, and the Gemm alone
    split = next(nd for nd in model.graph.node if nd.op_type == "Split")
    assert list(split.output) == ["y0", "y1", "y2", "y3"]
    x = rng.standard_normal((1, tokens, k)).astype(np.float32)
    got = dict(zip([o.name for o in model.graph.output], _session(model, library, supplied=arrays).run(None, {"x": x})))
    ours = bits == 4 or tokens <= KERNEL_MAX_TOKENS
    for i, (q, scale, block) in enumerate(weights):
        alone = _linear_model(q, scale, block, tokens, bits=bits)
        alone_arrays = {}
        assert use_cpu_kernels(alone, tmp_path, alone_arrays) == 1
        want = _session(alone, library, supplied=alone_arrays).run(None, {"x": x})[0]
        if ours:
            np.testing.assert_array_equal(got[f"y{i}"], want)
        else:
            np.testing.assert_allclose(got[f"y{i}"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        dense = dequantize_blockwise(q, scale, 0, block)           # and against the weights themselves
        if bits == 4:
            assert (np.abs(got[f"y{i}"] - x @ dense) <= _int4_activation_bound(x, dense) * 1.001 + 1e-5).all()
        else:
            exact = x @ dense
            np.testing.assert_allclose(got[f"y{i}"], exact, atol=(2e-4 if ours else 2e-2) * np.abs(exact).max())
    np.testing.assert_allclose(got["yf"], x @ numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "wf")), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 70])
def test_float_linears_of_one_input_run_as_one(library, tmp_path, tokens):
    """float32 MatMuls of one x, as torch's linear exports them (MatMul(x, Transpose(W [N, K]))) or on a [K, N]
    weight, become MatMul(x, Concat(weights)) and a Split, which ONNX Runtime folds at load; each output as
    before. A MatMul whose weight something else reads stays out."""
    rng = np.random.default_rng(tokens)
    k, widths = 96, [40, 16, 24]
    nodes, inits, outs = [], [], []
    for i, n in enumerate(widths):
        if i == 1:       # a [K, N] weight, read as it is
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), f"W{i}"))
            nodes.append(helper.make_node("Transpose", [f"W{i}"], [f"w{i}"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"lin{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, tokens, n]))
    inits.append(numpy_helper.from_array(rng.standard_normal((k, 8)).astype(np.float32), "shared"))
    nodes += [helper.make_node("MatMul", ["x", "shared"], ["ys"], name="shared_weight"),
              helper.make_node("Add", ["shared", "shared"], ["twice"])]      # "shared" is read twice
    outs += [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [1, tokens, 8]),
             helper.make_tensor_value_info("twice", TensorProto.FLOAT, [k, 8])]
    graph = helper.make_graph(nodes, "floats", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.standard_normal((1, tokens, k)).astype(np.float32)
    names = [o.name for o in outs]
    want = dict(zip(names, _session(model, library).run(None, {"x": x})))
    assert use_cpu_kernels(model, tmp_path) == 1
    onnx.checker.check_model(model)
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Concat") == 1 and ops.count("Split") == 1
    got = dict(zip(names, _session(model, library).run(None, {"x": x})))
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    weights = {t.name: numpy_helper.to_array(t) for t in inits}
    for i, n in enumerate(widths):      # and against numpy
        w = weights[f"w{i}"] if i == 1 else weights[f"W{i}"].T
        np.testing.assert_allclose(got[f"y{i}"], x @ w, rtol=1e-4, atol=1e-4)


def _int4_activation_bound(x, w):
    """How far int8 activations per block of 32 (scale max |x| / 127: within half a step) can move x @ w."""
    step = np.abs(x.reshape(*x.shape[:-1], -1, 32)).max(-1, keepdims=True) / 127 / 2
    return np.broadcast_to(step, (*x.shape[:-1], x.shape[-1] // 32, 32)).reshape(x.shape) @ np.abs(w)


NATIVE_VNNI = pytest.param("native", marks=pytest.mark.skipif(
    not ort_kernels._has_vnni(), reason="the native build's interleaved kernels need AVX-512 VNNI"))


@pytest.mark.parametrize("build", [NATIVE_VNNI, "portable"])   # the portable build's plain C runs on any CPU
@pytest.mark.parametrize("x_shape,n", [
    ((1, 1024), 2048),          # a mid-size decode step's linear
    ((2, 1, 64), 40),           # batch 2 decode step (rank 3)
    ((3, 5, 96), 24),           # 15 tokens: passes of four plus a remainder of three
    ((1, 70, 64), 16),          # a prefill longer than a tile of 64 tokens
    ((133, 256), 264),          # tiles, remainders and a work item of fewer groups
])
def test_int4_matmul_kernel_matches_the_reference(request, build, x_shape, n):
    library = request.getfixturevalue("library" if build == "native" else "portable_library")
    rng = np.random.default_rng(n)
    k = x_shape[-1]
    q, scale = quantize_blockwise((rng.standard_normal((k, n)) * 0.05).astype(np.float32), 0, 32, 4, np.float32)
    w, scales = int4_ref.interleave_linear(pack_int4(q), scale)
    dense = dequantize_blockwise(q, scale, 0, 32)
    np.testing.assert_array_equal(int4_ref.int4_matmul(np.eye(k, dtype=np.float32), w, scales), dense)  # round trip
    model = _linear_op_model(int4_ref.OP_TYPE, x_shape, w, scales)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = _session(model, library).run(None, {"x": x})[0]
    assert y.shape == x_shape[:-1] + (n,)
    ref = int4_ref.int4_matmul(x, w, scales)
    assert (np.abs(y - ref) <= _int4_activation_bound(x, dense) * 1.001 + 1e-5).all()


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="Int4MatMul is used only where the CPU has AVX-512 VNNI")
def test_int4_matmul_gives_a_row_and_a_token_the_same_bits_whatever_is_beside_them(library):
    """The kernel dots two groups of eight rows (one at an odd end) with up to eight tokens per unpacked block:
    a token's output must not depend on the tokens beside it, nor a row's on the group it is paired with."""
    rng = np.random.default_rng(5)
    k, n, m = 160, 24, 13                   # three groups: a pair and a single; 13 tokens: eight and five
    q, scale = quantize_blockwise((rng.standard_normal((k, n)) * 0.05).astype(np.float32), 0, 32, 4, np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def run(cols, xs):
        w, scales = int4_ref.interleave_linear(pack_int4(np.ascontiguousarray(q[:, cols])), scale[:, cols])
        return _session(_linear_op_model(int4_ref.OP_TYPE, [None, k], w, scales), library).run(None, {"x": xs})[0]

    together = run(slice(None), x)
    for t in (0, 7, 8, 12):
        np.testing.assert_array_equal(run(slice(None), x[t:t + 1])[0], together[t])
    np.testing.assert_array_equal(run(slice(0, 8), x), together[:, :8])      # group 0 alone, not in a pair
    np.testing.assert_array_equal(run(slice(8, 24), x), together[:, 8:])     # group 1 paired with 2, not 0


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="Int4MatMul is used only where the CPU has AVX-512 VNNI")
def test_int4_matmul_rounds_activations_to_int8_as_the_reference(library):
    """With one-hot weights of scale 1, Int4MatMul's output is each activation as the kernel rounded it (its int8
    value times its block's scale, one rounding): checked to the bit against int8_activations, on blocks whose
    x / scale falls on ties (max 127, halves), blocks of zeros, denormals, a NaN and random ones of every size."""
    rng = np.random.default_rng(11)
    m, k = 13, 96
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.integers(-6, 6, (m, k // 32)).repeat(32, -1)).astype(np.float32)
    x[0, :32] = rng.integers(-254, 255, 32) / 2                  # halves: ties to even
    x[0, 7] = 127.0                                              # so the scale is 1
    x[1, 32:64] = 0.0
    x[2, 64:] = rng.standard_normal(32) * 1e-41                  # denormals, in a block of a normal scale
    x[2, 70] = 1e-35
    x[3, 5] = np.nan
    q = np.eye(k, dtype=np.int8)                                 # column n reads x[:, n] alone
    w, scales = int4_ref.interleave_linear(pack_int4(q), np.ones((k // 32, k), np.float32))
    y = _session(_linear_op_model(int4_ref.OP_TYPE, [None, k], w, scales), library).run(None, {"x": x})[0]
    xq, xs = int4_ref.int8_activations(x)
    want = (xs.repeat(32, -1) * xq.astype(np.float32)).astype(np.float32)
    assert (xq[0, :32] % 2 == 0).sum() > 20 and not want[1, 32:64].any()
    np.testing.assert_array_equal(y[4:], want[4:])
    np.testing.assert_array_equal(y[:3], want[:3])
    np.testing.assert_array_equal(np.delete(y[3], 5), np.delete(want[3], 5))   # the NaN's own column aside


def test_int4_linear_layout_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 8"):
        int4_ref.interleave_linear(bytes(32 * 12 // 2), np.ones((1, 12), np.float32))
    with pytest.raises(ValueError, match="do not hold"):
        int4_ref.interleave_linear(bytes(10), np.ones((1, 16), np.float32))


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="Int4MatMul is used only where the CPU has AVX-512 VNNI")
@pytest.mark.parametrize("tokens", [1, 9, 70])
@pytest.mark.parametrize("supplied,gemm", [(False, None), (True, None),
                                           (True, {"alpha": 1.0, "beta": 1.0, "transB": 0})])
def test_int4_linear_rewrite_matches_matmulnbits_and_the_reference(library, tmp_path, tokens, supplied, gemm):
    rng = np.random.default_rng(tokens)
    k, n = 192, 56
    q, scale = quantize_blockwise((rng.standard_normal((k, n)) * 0.05).astype(np.float32), 0, 32, 4, np.float32)
    model = _linear_model(q, scale, 32, tokens, bits=4, gemm=gemm)
    x = rng.standard_normal((1, tokens, k) if gemm is None else (tokens, k)).astype(np.float32)
    nbits = _session(model, library, profile=str(tmp_path / "nbits")).run(None, {"x": x})[0]
    arrays = {} if supplied else None
    assert use_cpu_kernels(model, tmp_path, arrays) == 1
    onnx.checker.check_model(model)
    assert [(nd.domain, nd.op_type) for nd in model.graph.node] == [(CPU_DOMAIN, int4_ref.OP_TYPE)]
    assert {t.name for t in model.graph.initializer}.isdisjoint({"q", "scale"})       # the export's copy is dropped
    assert arrays is None or len(arrays) == 2
    y = _session(model, library, supplied=arrays).run(None, {"x": x})[0]
    # ONNX Runtime fuses the original into MatMulNBits with int8 activations per block: the same sums
    np.testing.assert_allclose(y, nbits, rtol=1e-4, atol=1e-5 * np.abs(nbits).max())
    dense = dequantize_blockwise(q, scale, 0, 32)
    assert (np.abs(y - x @ dense) <= _int4_activation_bound(x, dense) * 1.001 + 1e-5).all()


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="Int4MatMul is used only where the CPU has AVX-512 VNNI")
@pytest.mark.parametrize("block,tokens", [(64, 1), (128, 70)])
def test_int4_linear_rewrite_takes_larger_blocks(library, tmp_path, block, tokens):
    rng = np.random.default_rng(block + tokens)
    k, n = 256, 48
    q, scale = quantize_blockwise((rng.standard_normal((k, n)) * 0.05).astype(np.float32), 0, block, 4, np.float32)
    model = _linear_model(q, scale, block, tokens, bits=4)
    assert use_cpu_kernels(model, tmp_path) == 1
    assert [nd.op_type for nd in model.graph.node] == [int4_ref.OP_TYPE]
    x = rng.standard_normal((1, tokens, k)).astype(np.float32)
    y = _session(model, library).run(None, {"x": x})[0]
    dense = dequantize_blockwise(q, scale, 0, block)
    assert (np.abs(y - x @ dense) <= _int4_activation_bound(x, dense) * 1.001 + 1e-5).all()


def test_int4_linear_rewrite_leaves_other_weights_alone(tmp_path):
    rng = np.random.default_rng(3)
    q, scale = quantize_blockwise((rng.standard_normal((64, 16)) * 0.05).astype(np.float32), 0, 16, 4, np.float32)
    assert use_cpu_kernels(_linear_model(q, scale, 16, 1, bits=4), tmp_path) == 0      # blocks of 16
    q, scale = quantize_blockwise((rng.standard_normal((64, 12)) * 0.05).astype(np.float32), 0, 32, 4, np.float32)
    assert use_cpu_kernels(_linear_model(q, scale, 32, 1, bits=4), tmp_path) == 0      # N not a multiple of 8
    q, scale = quantize_blockwise((rng.standard_normal((64, 16)) * 0.05).astype(np.float32), 0, 32, 4, np.float32)
    for gemm in ({"alpha": 0.5}, {"transA": 1}):                                        # not a plain MatMul
        assert use_cpu_kernels(_linear_model(q, scale, 32, 1, bits=4, gemm=gemm), tmp_path) == 0


def _ran(profile_file: str) -> set[str]:
    events = json.loads(Path(profile_file).read_text())
    return {e["name"].removesuffix("_kernel_time") for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")}


@pytest.mark.parametrize("n", [1, KERNEL_MAX_TOKENS, KERNEL_MAX_TOKENS + 1, 70])
def test_rewrite_uses_our_kernel_for_decode_and_onnxruntime_for_prefill(library, tmp_path, n):
    rng = np.random.default_rng(n)
    fc1, fc2 = _weights(rng, 8, 16, 40)
    model = _moe_model(fc1, fc2, top_k=3, domain=DOMAIN)
    assert use_cpu_kernels(model) == 1
    assert any(o.domain == CPU_DOMAIN for o in model.opset_import)
    onnx.checker.check_model(model)
    sess = _session(model, library, profile=str(tmp_path / "p"))
    x = rng.standard_normal((n, 40)).astype(np.float32)
    logits = rng.standard_normal((n, 8)).astype(np.float32)
    y = sess.run(None, {"x": x, "logits": logits})[0]
    np.testing.assert_allclose(y, moe_ref.moe_dispatch(x, logits, fc1, fc2, 3), rtol=2e-5, atol=1e-6)
    ran = _ran(sess.end_profiling())
    ours = any(name.endswith("cpu_kernel/moe") for name in ran)
    assert ours == (n <= KERNEL_MAX_TOKENS), ran


def _qmoe_model(n_experts, inter, hidden, top_k, *, bits=4, block=32, seed=0):
    """A com.microsoft.QMoE node as ort_quant.fuse_quantized writes it, over experts quantized from random
    normal weights (unsigned, mid zero point; negative scales as the exporter's experts have), and those
    experts dequantized for the numpy reference."""
    rng = np.random.default_rng(seed)
    f32 = {"fc1": rng.standard_normal((n_experts, 2 * inter, hidden)) * 0.1,
           "fc2": rng.standard_normal((n_experts, hidden, inter)) * 0.1}
    inits, dense = [], {}
    for name, w in f32.items():
        q, scale = quantize_blockwise(w.astype(np.float32), 2, block, bits, np.float32, negative_scales=True)
        dense[name] = dequantize_blockwise(q, scale, 2, block)
        u = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
        if bits == 4:
            u = u[..., 0::2] | (u[..., 1::2] << 4)
        inits += [numpy_helper.from_array(u, name), numpy_helper.from_array(scale, f"{name}_scales")]
    node = helper.make_node("QMoE", ["x", "logits", "fc1", "fc1_scales", "", "fc2", "fc2_scales"], ["y"], name="qmoe",
                            domain="com.microsoft", k=top_k, normalize_routing_weights=1, **QMOE_SWIGLU,
                            expert_weight_bits=bits, block_size=block, accuracy_level=4)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden]),
              helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_experts])]
    graph = helper.make_graph([node], "qmoe", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return model, dense


@pytest.mark.parametrize("bits", [4, 8])
def test_interleaved_layouts_read_back_the_same_weights(bits):
    rng = np.random.default_rng(bits)
    k = 96
    stored = rng.integers(0, 256, (3, 24, k * bits // 8), dtype=np.uint8)   # 3 experts, 24 rows
    scales = rng.random((3, 24, k // 32)).astype(np.float32)
    interleave, rows = (moe_ref.interleave_int4_rows, moe_ref.int4_rows) if bits == 4 else \
        (moe_ref.interleave_int8_rows, moe_ref.int8_rows)
    w, s = interleave(stored, scales)
    assert w.shape == (3, 3, 3, 32 * bits) and s.shape == (3, 3, 3, 8)
    if bits == 4:      # value 2j in byte j's low nibble, 2j + 1 in its high one
        values = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(3, 24, k).astype(np.float32) - 8
    else:
        values = stored.astype(np.float32) - 128
        assert w[0, 1, 1, 32 * 3 + 4 * 5 + 2] == stored[0, 8 + 5, 32 + 4 * 3 + 2]   # chunk 3, row 5, byte 2
    np.testing.assert_array_equal(rows(w, s), values * np.repeat(scales, 32, axis=-1))
    with pytest.raises(ValueError, match="multiple of 8"):
        interleave(stored[:, :20], scales[:, :20])


@pytest.mark.parametrize("e,rows,k", [(3, 24, 96), (1, 8, 32), (2, 40, 1024)])
@pytest.mark.parametrize("bits", [4, 8])
def test_library_lays_out_the_experts_as_the_reference(library, bits, e, rows, k):
    rng = np.random.default_rng(e + rows + bits)
    stored = rng.integers(0, 256, (e, rows, k * bits // 8), dtype=np.uint8)
    scales = rng.random((e, rows, k // 32)).astype(np.float32)
    want = (moe_ref.interleave_int4_rows if bits == 4 else moe_ref.interleave_int8_rows)(stored, scales)
    assert ort_kernels._layouts() is not None                   # the library's, not the reference again
    got = ort_kernels.interleave_experts(bits, stored, scales)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="do not fit"):
        ort_kernels.interleave_experts(bits, stored[:, :rows - 4], scales[:, :rows - 4])


@pytest.mark.parametrize("k,n", [(32, 8), (96, 40), (1024, 2048)])
def test_library_lays_out_an_int4_linear_as_the_reference(library, k, n):
    rng = np.random.default_rng(k + n)
    packed = rng.integers(0, 256, k * n // 2, dtype=np.uint8).tobytes()
    scale = rng.random((k // 32, n)).astype(np.float32)
    for g, w in zip(ort_kernels.interleave_int4_linear(packed, scale), int4_ref.interleave_linear(packed, scale)):
        np.testing.assert_array_equal(g, w)


def _graph_ops(monkeypatch) -> list[str]:
    """The op types of every graph use_cpu_kernels hands on, from now on (filled as models load)."""
    ops, rewrite = [], ort_kernels.use_cpu_kernels

    def recorded(model, *args, **kwargs):
        n = rewrite(model, *args, **kwargs)
        ops.extend(nd.op_type for nd in model.graph.node)
        return n
    monkeypatch.setattr(ort_kernels, "use_cpu_kernels", recorded)
    return ops


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="Int4MoEDispatch is used only where the CPU has AVX-512 VNNI")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,e,i,h,k", [
    (1, 64, 256, 1024, 8),      # the mid-size MoE's decode step
    (8, 64, 256, 1024, 8),      # batch 8: experts shared between tokens
    (5, 7, 64, 96, 3),          # odd expert count and top-k
    (3, 4, 32, 64, 4),          # every expert chosen; one block of the expert width
    (70, 5, 32, 64, 1),         # a prefill: the kernel runs it too
])
@pytest.mark.parametrize("supplied", [False, True])
def test_quant_moe_rewrite_matches_qmoe_and_the_reference(library, tmp_path, n, e, i, h, k, supplied, bits):
    model, dense = _qmoe_model(e, i, h, k, bits=bits, seed=n + e)
    qmoe = _session(model, library)
    arrays = {} if supplied else None
    assert use_cpu_kernels(model, supplied=arrays) == 1
    onnx.checker.check_model(model)
    ops = {(nd.domain, nd.op_type) for nd in model.graph.node}
    assert ops == {(CPU_DOMAIN, moe_ref.INT4_OP_TYPE if bits == 4 else moe_ref.INT8_OP_TYPE)}
    inits = {t.name for t in model.graph.initializer}
    assert not inits & {"fc1", "fc1_scales", "fc2", "fc2_scales"}              # QMoE's layout is not loaded
    if supplied:     # placeholders in the graph, the arrays handed over as the backend does
        assert len(arrays) == 4 and all(model.graph.initializer[j].dims == [1] for j in range(4))
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, h)).astype(np.float32)
    logits = rng.standard_normal((n, e)).astype(np.float32)
    y = _session(model, library, supplied=arrays).run(None, {"x": x, "logits": logits})[0]
    # QMoE rounds the activations to int8 per block of 32 as the kernel does: the same sums. Except 8-bit
    # QMoE on a prefill-sized call, which keeps them in float: there within the kernel's rounding of x. And
    # with 8-bit weights, where the two scale their sums in a different order, a last-bit difference in the
    # fc2 activations can flip one's rounding to int8, one step at 8 bits: there within that step.
    want = qmoe.run(None, {"x": x, "logits": logits})[0]
    same_sums = bits == 4
    np.testing.assert_allclose(y, want, rtol=1e-4 if same_sums else 0,
                               atol=(1e-5 if same_sums else 5e-3) * np.abs(want).max())
    ref = moe_ref.moe_dispatch(x, logits, dense["fc1"], dense["fc2"], k)
    np.testing.assert_allclose(y, ref, rtol=0, atol=3e-2 * np.abs(ref).max())     # as test_quant_experts


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,e,i,h,k", [(8, 64, 256, 1024, 8), (5, 7, 64, 96, 3)])
def test_quant_moe_portable_build_matches_the_reference(library, portable_library, n, e, i, h, k, bits):
    """The quantized MoE kernels' plain C dot (the portable build) against the float reference, as the test above
    checks the AVX-512 one; and within one int8 step of the AVX-512 one (the same integer sums, the float epilogue
    rounded in another order: a last-bit difference in an fc2 activation can flip its int8 rounding)."""
    model, dense = _qmoe_model(e, i, h, k, bits=bits, seed=n + e)
    assert use_cpu_kernels(model) == 1
    rng = np.random.default_rng(n + 1)
    x, logits = rng.standard_normal((n, h)).astype(np.float32), rng.standard_normal((n, e)).astype(np.float32)
    portable = _session(model, portable_library).run(None, {"x": x, "logits": logits})[0]
    ref = moe_ref.moe_dispatch(x, logits, dense["fc1"], dense["fc2"], k)
    np.testing.assert_allclose(portable, ref, rtol=0, atol=3e-2 * np.abs(ref).max())     # as test_quant_experts
    native = _session(model, library).run(None, {"x": x, "logits": logits})[0]
    np.testing.assert_allclose(portable, native, rtol=0, atol=5e-3 * np.abs(native).max())


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_moe_kernel_gives_a_token_the_same_bits_alone_or_in_a_batch(library, bits):
    """The kernel dots up to eight of an expert's tokens per unpacked block; a token's output must not depend
    on how many others share its experts (16 experts, top 8 of them, 20 tokens: most experts get several, some
    more than eight)."""
    model, _ = _qmoe_model(16, 64, 96, 8, bits=bits, seed=7)
    assert use_cpu_kernels(model) == 1
    sess = _session(model, library)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((20, 96)).astype(np.float32)
    logits = rng.standard_normal((20, 16)).astype(np.float32)
    together = sess.run(None, {"x": x, "logits": logits})[0]
    for t in range(20):
        alone = sess.run(None, {"x": x[t:t + 1], "logits": logits[t:t + 1]})[0]
        np.testing.assert_array_equal(alone[0], together[t])


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block,n", [(64, 1), (128, 9), (64, 70)])
def test_quant_moe_rewrite_takes_larger_blocks(library, bits, block, n):
    """int4 / int8 experts exported in blocks of 64 or 128: the kernel reads their scales repeated per 32 values."""
    e, i, h, k = 6, 128, 256, 2
    model, dense = _qmoe_model(e, i, h, k, bits=bits, block=block, seed=block + n)
    qmoe = _session(model, library)
    assert use_cpu_kernels(model) == 1
    assert {nd.op_type for nd in model.graph.node} == {moe_ref.INT4_OP_TYPE if bits == 4 else moe_ref.INT8_OP_TYPE}
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, h)).astype(np.float32)
    logits = rng.standard_normal((n, e)).astype(np.float32)
    y = _session(model, library).run(None, {"x": x, "logits": logits})[0]
    # QMoE rounds the activations its own way (per its block, or not at all), so the outputs differ by
    # rounding; ours must be as close to the float reference as QMoE's (measured: 1.2-2 % of the largest
    # output for both)
    want = qmoe.run(None, {"x": x, "logits": logits})[0]
    ref = moe_ref.moe_dispatch(x, logits, dense["fc1"], dense["fc2"], k)
    error = lambda out: np.abs(out - ref).max() / np.abs(ref).max()               # noqa: E731
    assert error(y) <= max(1.25 * error(want), 1e-3) and error(y) <= 3e-2


def _float16_scales(model):
    """`model` with every float32 scale rounded to a float16 (as the exporter stores them; the loader widens them
    back to float32), a few of them float16 subnormals, so that the rewrite lays them out in float16."""
    rng = np.random.default_rng(3)
    for t in model.graph.initializer:
        if "scale" in t.name and t.data_type == TensorProto.FLOAT:
            s = numpy_helper.to_array(t).astype(np.float16)
            tiny = rng.random(s.shape) < 0.05                                          # 2^-20 .. 2^-15
            s[tiny] = np.sign(s[tiny]) * rng.integers(1, 32, tiny.sum()) * np.float16(2.0 ** -20)
            t.CopyFrom(numpy_helper.from_array(s.astype(np.float32), t.name))
    return model


def _linear_int4_model(rng):
    q, scale = quantize_blockwise((rng.standard_normal((160, 48)) * 0.05).astype(np.float32), 0, 32, 4, np.float32)
    return _linear_model(q, scale, 32, 11, bits=4)


# Each quantized kernel's rewrite source, built from a seeded generator: (model, its inputs)
_QUANT_MODELS = {
    "moe int4": lambda rng: (_qmoe_model(12, 64, 96, 4, bits=4, seed=4)[0], 12),
    "moe int8": lambda rng: (_qmoe_model(12, 64, 96, 4, bits=8, seed=8)[0], 12),
    "moe int4 + shared": lambda rng: (_with_shared_expert(_qmoe_model(6, 64, 96, 2, seed=1)[0], 64, bits=4, seed=2)[0],
                                      6),
    "linear int4": lambda rng: (_linear_int4_model(rng), None),
}


def _quant_model(which):
    """`which` of _QUANT_MODELS and random inputs for it (11 tokens; the MoE models' logits over their experts)."""
    rng = np.random.default_rng(9)
    model, experts = _QUANT_MODELS[which](rng)
    if experts is None:
        return model, {"x": rng.standard_normal((1, 11, 160)).astype(np.float32)}
    return model, {"x": rng.standard_normal((11, 96)).astype(np.float32),
                   "logits": rng.standard_normal((11, experts)).astype(np.float32)}


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("which", list(_QUANT_MODELS))
def test_quantized_kernels_give_the_same_bits_from_float16_scales(request, build, which):
    """Scales that are all exactly float16 are laid out in float16 (a tenth less of a 4-bit layout to read), the
    kernels widen them exactly: the same outputs, to the bit, as from the same scales in float32 (subnormal
    float16s included), in the AVX-512 loop and in the portable build's plain C; and as close to ONNX Runtime's
    own ops on the unrewritten graph (QMoE, DequantizeLinear + MatMul) as the kernels' tests allow."""
    library = request.getfixturevalue("library" if build == "native" else "portable_library")
    model, feeds = _quant_model(which)
    model, arrays = _float16_scales(model), {}
    want = _session(model, library).run(None, feeds)[0]
    assert use_cpu_kernels(model, supplied=arrays) == 1
    scales = {name: a for name, a in arrays.items() if name.endswith("scales")}
    assert scales and all(a.dtype == np.float16 for a in scales.values())
    widened = {name: a.astype(np.float32) if name in scales else a for name, a in arrays.items()}
    half = _session(model, library, supplied=arrays).run(None, feeds)[0]
    single = _session(model, library, supplied=widened).run(None, feeds)[0]
    np.testing.assert_array_equal(half, single)
    assert np.abs(half).max() > 0
    np.testing.assert_allclose(half, want, rtol=0, atol=3e-2 * np.abs(want).max())     # as test_quant_experts


def test_layouts_keep_float16_scales_only_where_exact():
    s = np.array([[[0.5, -3.0, 2.0 ** -20]] * 8], np.float32)                       # [1, 8, 3]: exact in float16
    assert moe_ref.interleave_scales(s).dtype == np.float16
    for odd in (1 / 3, 1e-7, 7e4):                # more bits than float16 has; under its subnormals; over its range
        t = s.copy()
        t[0, 5, 1] = odd
        got = moe_ref.interleave_scales(t)
        assert got.dtype == np.float32 and got[0, 0, 1, 5] == np.float32(odd)


def test_quant_moe_rewrite_leaves_other_experts_alone():
    assert use_cpu_kernels(_qmoe_model(4, 64, 128, 2, block=16)[0]) == 0           # blocks of 16
    assert use_cpu_kernels(_qmoe_model(4, 64, 128, 2, bits=8, block=16)[0]) == 0   # 8-bit, blocks of 16
    assert use_cpu_kernels(_qmoe_model(4, 256, 256, 2, bits=8, block=256)[0]) == 0  # 8-bit, blocks of 256
    model = _qmoe_model(4, 32, 64, 2)[0]
    model.graph.node[0].attribute.append(helper.make_attribute("swiglu_limit", 7.0))
    for a in model.graph.node[0].attribute:
        if a.name == "activation_alpha":
            a.f = 1.702                                                              # another SwiGLU
    assert use_cpu_kernels(model) == 0


def _with_shared_expert(model, inter, *, bits=None, block=32, seed=0):
    """`model` (one MoE node giving "y" from "x") with the exporter's shared expert beside it, as
    exporter.blocks.layers writes it: y = moe + sigmoid(x . g) * down(silu(gate(x)) * up(x)). Float32: Gemms on
    [out, in] weights (transB); `bits`: the export's signed blockwise DequantizeLinears [K, N] read by plain Gemms.
    Returns the model and the weights as the reference takes them (gate, up, down, g; dequantized)."""
    rng = np.random.default_rng(seed)
    g = model.graph
    hidden = next(d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:])
    g.node[0].output[0] = "moe"
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter), "g": (1, hidden)}
    dense, nodes = {}, []
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if bits is None:
            dense[name] = w
            g.initializer.append(numpy_helper.from_array(w, f"shared.{name}"))
            continue
        q, scale = quantize_blockwise(np.ascontiguousarray(w.T), 0, block, bits, np.float32)     # [K, N]
        dense[name] = np.ascontiguousarray(dequantize_blockwise(q, scale, 0, block).T)
        data = pack_int4(q) if bits == 4 else q.tobytes()
        data_type = TensorProto.INT4 if bits == 4 else TensorProto.INT8
        g.initializer.extend([helper.make_tensor(f"shared.{name}.q", data_type, q.shape, data, raw=True),
                              numpy_helper.from_array(scale, f"shared.{name}.scale")])
        nodes.append(helper.make_node("DequantizeLinear", [f"shared.{name}.q", f"shared.{name}.scale"],
                                      [f"shared.{name}"], name=f"dq_{name}", axis=0, block_size=block))
    trans = {"transB": 1} if bits is None else {}

    def linear(x, name):
        return helper.make_node("Gemm", [x, f"shared.{name}"], [f"{name}_out"], name=name, **trans)

    nodes += [linear("x", "g"), helper.make_node("Sigmoid", ["g_out"], ["weight"]),
              linear("x", "gate"), helper.make_node("Sigmoid", ["gate_out"], ["gate_sig"]),
              helper.make_node("Mul", ["gate_out", "gate_sig"], ["silu"]), linear("x", "up"),
              helper.make_node("Mul", ["silu", "up_out"], ["act"]), linear("act", "down"),
              helper.make_node("Mul", ["weight", "down_out"], ["shared"]),
              helper.make_node("Add", ["moe", "shared"], ["y"])]
    g.node.extend(nodes)
    return model, dense


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("n", [1, 8, 70])
def test_shared_expert_joins_the_int4_moe_kernel(library, block, n):
    """4-bit QMoE plus the export's int4 shared expert -> one Int4SharedMoEDispatch, which reads the shared expert
    as one more expert: the reference's sum, as close to it as the unfused graph run by ONNX Runtime."""
    e, i, h, k = 6, 128, 128, 2
    model, dense = _qmoe_model(e, i, h, k, seed=n + block)
    model, shared = _with_shared_expert(model, i, bits=4, block=block, seed=n)
    unfused = _session(model, library)
    arrays = {}
    assert use_cpu_kernels(model, supplied=arrays) == 1
    onnx.checker.check_model(model)
    assert [nd.op_type for nd in model.graph.node] == [moe_ref.INT4_SHARED_OP_TYPE]
    assert not {t.name for t in model.graph.initializer} & {f"shared.{w}.q" for w in shared}     # relaid, not kept
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, h)).astype(np.float32)
    logits = rng.standard_normal((n, e)).astype(np.float32)
    y = _session(model, library, supplied=arrays).run(None, {"x": x, "logits": logits})[0]
    ref = moe_ref.moe_dispatch(x, logits, dense["fc1"], dense["fc2"], k) + \
        moe_ref.shared_expert(x, shared["gate"], shared["up"], shared["down"], shared["g"])
    p = "qmoe/cpu_kernel/"
    laid = moe_ref.quant_shared_moe_dispatch(x, logits, *(arrays[p + a] for a in (
        "fc1", "fc1_scales", "fc2", "fc2_scales", "shared_fc1", "shared_fc1_scales", "shared_fc2", "shared_fc2_scales",
        "shared_gate")), k)
    np.testing.assert_allclose(laid, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())     # the layout holds the weights
    error = lambda out: np.abs(out - ref).max() / np.abs(ref).max()                       # noqa: E731
    want = unfused.run(None, {"x": x, "logits": logits})[0]
    assert error(y) <= max(1.5 * error(want), 1e-3) and error(y) <= 3e-2, (error(y), error(want))


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
def test_shared_expert_stays_apart_where_it_does_not_fit(library):
    e, i, h = 4, 32, 64
    ops = lambda m: {nd.op_type for nd in m.graph.node}                             # noqa: E731
    model, _ = _with_shared_expert(_qmoe_model(e, i, h, 2)[0], i, bits=4)
    model.graph.output.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, None))    # read outside it
    use_cpu_kernels(model)
    assert moe_ref.INT4_OP_TYPE in ops(model) and moe_ref.INT4_SHARED_OP_TYPE not in ops(model)
    model, _ = _with_shared_expert(_qmoe_model(e, i, h, 2, bits=8)[0], i, bits=8)     # 8-bit: no gain measured
    use_cpu_kernels(model)
    assert moe_ref.INT8_OP_TYPE in ops(model) and "Gemm" in ops(model)
    rng = np.random.default_rng(5)
    fc1, fc2 = _weights(rng, e, i, h)
    model, _ = _with_shared_expert(_moe_model(fc1, fc2, top_k=2, domain=DOMAIN), i)        # float32: likewise
    assert use_cpu_kernels(model) == 1 and sum(nd.op_type == "Gemm" for nd in model.graph.node) == 4


@pytest.mark.skipif(not ort_kernels._has_vnni(), reason="the interleaved kernels need AVX-512 VNNI")
def test_int4_export_runs_its_shared_expert_inside_the_moe_kernel(library, tmp_path, monkeypatch):
    """An int4 export whose shared expert is as wide as the experts (as the published 35B-A3B's; the mid
    preset at hidden 128, two GDN layers): the exporter's nodes are found, and the tokens are ONNX Runtime's
    own (QMoE, MatMulNBits)."""
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny
    from dualbrain.runtime.model import Model

    ckpt = make_tiny(tmp_path / "ckpt", family="moe", preset="mid", num_layers=2, vocab_size=1000, hidden_size=128)
    export = export_checkpoint(ckpt, tmp_path / "int4", quant="int4")
    ops = _graph_ops(monkeypatch)
    ours, theirs = Model.load(export), Model.load(export, cpu_kernels=False)
    assert ops.count(moe_ref.INT4_SHARED_OP_TYPE) == 2 and moe_ref.INT4_OP_TYPE not in ops
    assert ops.count("Gemm") == 2        # the routers, at 8 bits (QuantMode.router_bits): ONNX Runtime's MatMulNBits
    prompt = np.random.default_rng(3).integers(0, 1000, (2, 9))
    states = [m.new_state(2) for m in (ours, theirs)]
    ids = prompt
    same = []
    for step in range(8):                                      # prefill, then decode
        logits = [m.forward(ids, s) for m, s in zip((ours, theirs), states)]
        # both round the activations to int8, each its own way
        np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=2e-2 * np.abs(logits[1]).max())
        same += list((logits[0].argmax(-1) == logits[1].argmax(-1)).ravel())
        ids = logits[1].argmax(-1)[:, None]
    assert sum(same) >= 14      # of 16: random weights' near ties (measured: one, a top-2 gap of 0.13) may flip


def test_node_cost_benchmark_times_equal_graphs():
    """tests/benchmarks/ort_node_costs.py sets a chain of plain nodes against the same chain behind the
    runtime's decode/prefill If: both must compute the same thing, or the difference is not the If's."""
    import importlib.util

    path = Path(__file__).parent / "benchmarks" / "ort_node_costs.py"
    spec = importlib.util.spec_from_file_location("ort_node_costs", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = {"x": np.random.default_rng(3).standard_normal((1, 1, 48)).astype(np.float32)}
    plain, wrapped = (bench.chain(5, 48, behind_if) for behind_if in (False, True))
    assert [n.op_type for n in wrapped.graph.node].count("If") == 5
    assert not any(n.op_type == "If" for n in plain.graph.node)
    out = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
           for m in (plain, wrapped)]
    np.testing.assert_array_equal(out[0], np.maximum(x["x"], 0))
    np.testing.assert_array_equal(out[1], out[0])     # the If took its Relu (decode) branch


def test_rewrite_leaves_other_dtypes_and_quantized_experts_alone():
    rng = np.random.default_rng(0)
    fc1, fc2 = _weights(rng, 4, 8, 16)
    assert use_cpu_kernels(_moe_model(fc1.astype(np.float16), fc2.astype(np.float16), top_k=2, domain=DOMAIN)) == 0
    model = _moe_model(fc1, fc2, top_k=2, domain=DOMAIN)
    model.graph.node[0].input[2] = "fc1_dq"       # experts computed by another node (e.g. DequantizeLinear)
    assert use_cpu_kernels(model) == 0


def test_every_kernel_source_ships_in_the_package():
    """An installed (not editable) dualbrain must carry each C file the library is built from, or the
    kernels turn off with a warning on users' machines while every test here passes."""
    import fnmatch
    import tomllib

    root = Path(ort_kernels.__file__).parents[2]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for source in ort_kernels.SOURCES + ort_kernels.HEADERS:
        package = ".".join(["dualbrain", *source.parent.relative_to(root).parts])
        assert package in setup["packages"], package
        assert any(fnmatch.fnmatch(source.name, pat) for pat in setup["package-data"].get(package, [])), source


def test_library_is_cached_and_switchable(library, monkeypatch):
    ort_kernels.library.cache_clear()
    try:
        assert ort_kernels.library() == library                  # the cached build, not a new one
        ort_kernels.library.cache_clear()
        monkeypatch.setenv(ort_kernels.ENV_SWITCH, "0")
        assert ort_kernels.library() is None
    finally:
        ort_kernels.library.cache_clear()


def test_unwritable_cache_warns_and_runs_without(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DUALBRAIN_CACHE", str(blocked))             # kernels/ cannot be made under a file
    ort_kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no writable cache folder"):
            assert ort_kernels.library() is None
    finally:
        ort_kernels.library.cache_clear()


def test_failed_build_warns_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALBRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")                             # a "compiler" that always fails
    ort_kernels.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert ort_kernels.library() is None
        assert any("CPU kernels off" in str(w.message) for w in seen)
        assert not any(tmp_path.rglob("*.so*"))
    finally:
        ort_kernels.library.cache_clear()


def test_tiny_moe_export_gives_the_same_tokens_with_and_without_the_kernel(artifacts, library):
    from dualbrain.runtime.model import Model

    export = artifacts.export(artifacts.checkpoint("moe"))
    ours, theirs = Model.load(export), Model.load(export, cpu_kernels=False)
    assert ours.backend.cpu_kernels == library and theirs.backend.cpu_kernels is None
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, ours.vocab_size, (2, 9))
    states = [m.new_state(2) for m in (ours, theirs)]
    ids = [prompt, prompt]
    for step in range(12):                                      # prefill (18 tokens), then decode
        logits = [m.forward(i, s) for m, i, s in zip((ours, theirs), ids, states)]
        np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4 * np.abs(logits[1]).max())
        assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()
        ids = [lg.argmax(-1)[:, None] for lg in logits]


def test_tiny_moe_export_runs_its_attention_in_our_kernel(artifacts, library, monkeypatch):
    """Every full-attention layer of the linked graph runs CachedAttention (no Softmax, no K/V Concat left); the
    logits over a padded prefill and decode steps are those of the split form ONNX Runtime runs without it."""
    from dualbrain.runtime.model import Model

    export = artifacts.export(artifacts.checkpoint("moe"))
    ops = _graph_ops(monkeypatch)
    ours, theirs = Model.load(export), Model.load(export, cpu_kernels=False)
    states = [m.new_state(2) for m in (ours, theirs)]
    ids = np.random.default_rng(4).integers(0, ours.vocab_size, (2, 13))
    pad = np.ones_like(ids)
    pad[1, :4] = 0                                              # row 1 left-padded
    for step in range(8):
        logits = [m.forward(ids, st, pad=pad if step == 0 else None) for m, st in zip((ours, theirs), states)]
        np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4 * np.abs(logits[1]).max())
        ids = logits[1].argmax(-1)[:, None]
    attention_layers = ours.spec.layer_types.count("full_attention")
    assert attention_layers >= 1 and ops.count(attention_ref.OP_TYPE) == attention_layers      # the linked graph's
    assert "Softmax" not in ops


def test_export_runs_each_gdn_mixer_in_one_kernel(library, tmp_path, monkeypatch):
    """A real float32 export (tiny MoE, three GDN layers): each GDN layer's conv, split, reshapes, q/k norms, rule
    and gated output norm become one GatedDeltaMixer; the shape arithmetic that only fed them goes too. The
    logits are those of the same kernels with the mixer's nodes apart, and of ONNX Runtime's own functions."""
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny
    from dualbrain.runtime.model import Model

    ckpt = make_tiny(tmp_path / "ckpt", family="moe", num_layers=4)
    export = export_checkpoint(ckpt, tmp_path / "fp32")
    ops = _graph_ops(monkeypatch)
    fused = Model.load(export)
    fused_ops = list(ops)
    assert fused_ops.count(gdn_ref.MIXER_RAW_OP_TYPE) == 3 and gdn_ref.MIXER_OP_TYPE not in fused_ops
    assert not {gdn_ref.OP_TYPE, conv_ref.OP_TYPE, "Softplus"} & set(fused_ops)
    ops.clear()
    monkeypatch.setattr(ort_kernels, "_gated_delta_mixer", lambda rule, r: None)
    apart = Model.load(export)
    assert ops.count(gdn_ref.OP_TYPE) == ops.count(conv_ref.OP_TYPE) == 3
    assert ops.count("Split") == fused_ops.count("Split") + 3
    assert len(fused_ops) < len(ops) - 3 * 23         # the mixers' 13 nodes and gates' 10, and the shape nodes
    onnx_functions = Model.load(export, cpu_kernels=False)
    models = (fused, apart, onnx_functions)
    states = [m.new_state(3) for m in models]
    ids = np.random.default_rng(5).integers(0, 1000, (3, 11))
    for step in range(6):                                       # prefill, then decode
        logits = [m.forward(ids, s) for m, s in zip(models, states)]
        for other in logits[1:]:
            np.testing.assert_allclose(logits[0], other, rtol=0, atol=1e-4 * np.abs(other).max())
        ids = logits[2].argmax(-1)[:, None]


def test_gdn_mixer_stays_apart_where_a_value_in_it_is_read_elsewhere(tmp_path):
    """One of the mixer's values also a graph output: the nodes stay, and the rule still gets its own kernel."""
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny
    from dualbrain.runtime.backends.ort_fusions import fuse_rms_norm

    export = export_checkpoint(make_tiny(tmp_path / "ckpt", num_layers=1), tmp_path / "fp32")
    model = onnx.load(str(export / "layer_000.onnx"), load_external_data=False)
    fuse_rms_norm(model)
    # conv, rule, and the float linears of one input as one: the input projections, the MLP's gate and up
    assert use_cpu_kernels(onnx.ModelProto.FromString(model.SerializeToString()), export) == 4
    split = next(n for n in model.graph.node if n.op_type == "Split")
    model.graph.output.append(helper.make_tensor_value_info(split.output[1], TensorProto.FLOAT, None))
    assert use_cpu_kernels(model, export) == 4
    ops = [(n.op_type, n.domain) for n in model.graph.node]
    assert (gdn_ref.OP_TYPE, CPU_DOMAIN) in ops and (conv_ref.OP_TYPE, CPU_DOMAIN) in ops and ("Split", "") in ops
    assert gdn_ref.MIXER_OP_TYPE not in {op for op, _ in ops}


def test_gdn_gates_stay_apart_where_a_value_in_them_is_read_elsewhere(tmp_path):
    """beta (the Sigmoid of b) also a graph output: the mixer still takes one node, fed the gates' g and beta."""
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny
    from dualbrain.runtime.backends.ort_fusions import fuse_rms_norm

    export = export_checkpoint(make_tiny(tmp_path / "ckpt", num_layers=1), tmp_path / "fp32")
    model = onnx.load(str(export / "layer_000.onnx"), load_external_data=False)
    fuse_rms_norm(model)
    rule = next(n for n in model.graph.node if n.op_type == gdn_ref.OP_TYPE)
    model.graph.output.append(helper.make_tensor_value_info(rule.input[4], TensorProto.FLOAT, None))
    use_cpu_kernels(model, export)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(gdn_ref.MIXER_OP_TYPE) == 1 and gdn_ref.MIXER_RAW_OP_TYPE not in ops
    assert {"Sigmoid", "Softplus", "Where"} <= set(ops)
