"""dualbrain::GatedDeltaRule(+Window): numpy reference vs transformers' recurrent and chunked gated
delta rule, torch eager vs reference, and the dynamo-exported single-node graph (dynamic B, T) run
by ONNX Runtime with both function bodies (com.microsoft.LinearAttention and the standard Loop)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from dualbrain.plugins.gated_delta import function as gfn
from dualbrain.plugins.gated_delta import reference as ref

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from dualbrain.plugins.gated_delta import op as gop  # noqa: E402

DK, DV = 16, 24
TS = (1, 7, 63, 65, 130)
BS = (1, 3)
HEADS = ((2, 4), (4, 4))
NAMES = ["q", "k", "v", "g", "beta", "state"]


def _close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


def _l2(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def _data(B, T, Hk, Hv, seed=0):
    """Returns (raw_q, inputs): raw_q is L2-normalised but unscaled (what transformers takes),
    inputs are the op's float32 (q, k, v, g, beta, state) with q scaled by DK**-0.5."""
    rng = np.random.default_rng(seed + 7919 * B + 31 * T + Hk)
    q = _l2(rng.standard_normal((B, T, Hk, DK))).astype(np.float32)
    k = _l2(rng.standard_normal((B, T, Hk, DK))).astype(np.float32)
    v = rng.standard_normal((B, T, Hv, DV)).astype(np.float32)
    g = (-rng.uniform(0.005, 1.5, (B, T, Hv))).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (B, T, Hv)).astype(np.float32)
    state = (rng.standard_normal((B, Hv, DK, DV)) * 0.5).astype(np.float32)
    qs = (q * np.float32(DK ** -0.5)).astype(np.float32)
    return q, [qs, k, v, g, beta, state]


def _hf():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m
    return m


# ----------------------------------------------------------------------------- reference vs transformers
@pytest.mark.parametrize("Hk,Hv", HEADS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_reference_matches_transformers(T, B, Hk, Hv):
    q_raw, (qs, k, v, g, beta, state) = _data(B, T, Hk, Hv)
    o, S = ref.gated_delta_rule(qs, k, v, g, beta, state)
    assert o.shape == (B, T, Hv, DV) and S.shape == (B, Hv, DK, DV)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    m = _hf()
    for fn in (m.torch_recurrent_gated_delta_rule, m.torch_chunk_gated_delta_rule):
        o_hf, S_hf = fn(t(q_raw), t(k), t(v), g=t(g), beta=t(beta), initial_state=t(state),
                        output_final_state=True, use_qk_l2norm_in_kernel=False)
        _close(o, o_hf.numpy())
        _close(S, S_hf.numpy())


@pytest.mark.parametrize("Hk,Hv", HEADS)
@pytest.mark.parametrize("T", TS)
def test_reference_chaining_and_window(T, Hk, Hv):
    _, x = _data(3, T + 1, Hk, Hv, seed=1)
    o_all, S_all, Ss_all = ref.gated_delta_rule(*x, window=True)
    head = [a[:, :T] for a in x[:5]]
    tail = [a[:, T:] for a in x[:5]]
    o1, S1, Ss1 = ref.gated_delta_rule(*head, x[5], window=True)
    o2, S2 = ref.gated_delta_rule(*tail, S1)
    _close(np.concatenate([o1, o2], 1), o_all, 1e-6)
    _close(S2, S_all, 1e-6)
    _close(Ss1, Ss_all[:, :T], 1e-6)
    np.testing.assert_array_equal(Ss_all[:, -1], S_all)


# ----------------------------------------------------------------------------- torch eager vs reference
@pytest.mark.parametrize("Hk,Hv", HEADS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (1, 65), (3, 130)])
def test_torch_eager_matches_reference(B, T, Hk, Hv):
    _, x = _data(B, T, Hk, Hv, seed=2)
    got = gop.gated_delta_rule(*[torch.from_numpy(a) for a in x], window=True)
    want = ref.gated_delta_rule(*x, window=True)
    assert len(got) == 3
    for a, r in zip(got, want):
        assert a.dtype == torch.float32 and tuple(a.shape) == r.shape
        _close(a.numpy(), r)
    got2 = gop.gated_delta_rule(*[torch.from_numpy(a) for a in x])
    assert len(got2) == 2
    for a, r in zip(got2, want[:2]):
        _close(a.numpy(), r)


def test_torch_eager_rejects_bad_heads():
    _, x = _data(1, 2, 3, 4)
    with pytest.raises(ValueError):
        gop.gated_delta_rule(*[torch.from_numpy(a) for a in x])


# ----------------------------------------------------------------------------- export + ONNX Runtime
class _Wrap(torch.nn.Module):
    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, g, beta, state):
        return gop.gated_delta_rule(q, k, v, g, beta, state, window=self.window)


_EXPORTS: dict = {}


def _export(window: bool, Hk: int, Hv: int) -> onnx.ModelProto:
    key = (window, Hk, Hv)
    if key not in _EXPORTS:
        _, x = _data(2, 5, Hk, Hv)
        Bd, Td = torch.export.Dim("B"), torch.export.Dim("T")
        bt = {0: Bd, 1: Td}
        prog = torch.onnx.export(_Wrap(window), tuple(torch.from_numpy(a) for a in x), dynamo=True,
                                 dynamic_shapes=(bt, bt, bt, bt, bt, {0: Bd}), input_names=NAMES,
                                 verbose=False)
        _EXPORTS[key] = prog.model_proto
    m = onnx.ModelProto()
    m.CopyFrom(_EXPORTS[key])
    return m


def _attach(model: onnx.ModelProto, use_contrib: bool) -> onnx.ModelProto:
    opset = next(o.version for o in model.opset_import if o.domain == "")
    model.functions.extend(gfn.onnx_functions(opset, use_contrib=use_contrib))
    if use_contrib:
        model.opset_import.append(onnx.helper.make_opsetid(gfn.MS_DOMAIN, 1))
    return model


CASES = [(False, True, 2, 4), (False, True, 4, 4), (False, False, 2, 4), (True, True, 2, 4), (True, True, 4, 4)]


@pytest.mark.parametrize("window,use_contrib,Hk,Hv", CASES)
def test_export_and_onnxruntime(window, use_contrib, Hk, Hv):
    model = _attach(_export(window, Hk, Hv), use_contrib)
    op_type = gfn.OP_TYPE_WINDOW if window else gfn.OP_TYPE
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(gfn.DOMAIN, op_type)]
    node = model.graph.node[0]
    assert {a.name: a.i for a in node.attribute} == {"num_k_heads": Hk, "num_v_heads": Hv}
    assert len(node.output) == (3 if window else 2)
    assert any(o.domain == gfn.DOMAIN for o in model.opset_import)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param
    body = {n.op_type for f in model.functions if f.name == op_type for n in f.node}
    assert ("LinearAttention" in body) == (use_contrib and not window)
    assert ("Loop" in body) == (window or not use_contrib)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for B, T in [(1, 1), (3, 7), (1, 63), (3, 65), (2, 130)]:
        _, x = _data(B, T, Hk, Hv, seed=5)
        got = sess.run(None, dict(zip(NAMES, x)))
        want = ref.gated_delta_rule(*x, window=window)
        assert len(got) == len(want)
        for a, r in zip(got, want):
            assert a.dtype == np.float32 and a.shape == r.shape
            _close(a, r)


def test_functions_are_well_formed():
    for use_contrib in (True, False):
        fns = gfn.onnx_functions(21, use_contrib=use_contrib)
        assert [(f.domain, f.name) for f in fns] == [(gfn.DOMAIN, gfn.OP_TYPE), (gfn.DOMAIN, gfn.OP_TYPE_WINDOW)]
        for f in fns:
            assert list(f.input) == NAMES
            assert list(f.attribute) == ["num_k_heads", "num_v_heads"]
            assert ("", 21) in {(o.domain, o.version) for o in f.opset_import}


@pytest.mark.parametrize("window,use_contrib", [(False, True), (False, False), (True, True)])
def test_checker_accepts_model(window, use_contrib):
    onnx.checker.check_model(_attach(_export(window, 2, 4), use_contrib))
