"""dualbrain::CausalConv1d(+Window): numpy reference vs transformers' Qwen3.5 conv paths, torch eager
vs reference, and the dynamo-exported single-node graph (dynamic B, T) run by ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from dualbrain.plugins.causal_conv import function as cfn
from dualbrain.plugins.causal_conv import reference as ref

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from dualbrain.plugins.causal_conv import op as cop  # noqa: E402

C, K = 40, 4
TS = (1, 7, 63, 65, 130)
BS = (1, 3)
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=1e-2, atol=2e-3)}


def _close(got, want, dtype=np.float32):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    t = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=t["rtol"], atol=t["atol"] * max(1.0, np.abs(want).max()))


def _data(B, T, dtype=np.float32, seed=0, zero_state=False):
    rng = np.random.default_rng(seed + 1000 * B + T)
    x = rng.standard_normal((B, T, C)).astype(dtype)
    w = (rng.standard_normal((C, K)) * 0.5).astype(dtype)
    s = np.zeros((B, C, K - 1), dtype) if zero_state else rng.standard_normal((B, C, K - 1)).astype(dtype)
    return x, w, s


def _hf():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m
    return m


# ----------------------------------------------------------------------------- reference vs transformers
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_reference_matches_transformers_prefill(B, T):
    x, w, s = _data(B, T, zero_state=True)
    want = _hf().causal_conv1d_fn(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(w), None,
                                  activation="silu").transpose(1, 2).numpy()
    y, st = ref.causal_conv1d(x, w, s)
    _close(y, want)
    # the state is the last K-1 inputs, zero-padded on the left
    padded = np.concatenate([np.zeros((B, K - 1, C), np.float32), x], axis=1)[:, -(K - 1):]
    np.testing.assert_array_equal(st, padded.transpose(0, 2, 1))


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_reference_matches_transformers_update(B, T):
    x, w, s = _data(B, T)
    state = torch.from_numpy(s.copy())
    want = _hf().causal_conv1d_update(torch.from_numpy(x).transpose(1, 2), state, torch.from_numpy(w), None,
                                      "silu").transpose(1, 2).numpy()
    y, st, sts = ref.causal_conv1d(x, w, s, window=True)
    _close(y, want)
    np.testing.assert_array_equal(st, state.numpy())
    np.testing.assert_array_equal(sts[:, -1], st)


@pytest.mark.parametrize("T", TS)
def test_reference_chaining_and_window(T):
    B = 3
    x, w, s = _data(B, T + 1)
    y_all, st_all, sts_all = ref.causal_conv1d(x, w, s, window=True)
    y1, st1, sts1 = ref.causal_conv1d(x[:, :T], w, s, window=True)
    y2, st2 = ref.causal_conv1d(x[:, T:], w, st1)
    np.testing.assert_array_equal(np.concatenate([y1, y2], 1), y_all)
    np.testing.assert_array_equal(st2, st_all)
    np.testing.assert_array_equal(sts1, sts_all[:, :T])
    # each windowed state restarts the conv exactly
    t = T // 2
    y3, st3 = ref.causal_conv1d(x[:, t + 1:], w, sts_all[:, t])
    np.testing.assert_array_equal(y3, y_all[:, t + 1:])
    np.testing.assert_array_equal(st3, st_all)


# ----------------------------------------------------------------------------- torch eager vs reference
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (1, 65), (3, 130)])
def test_torch_eager_matches_reference(B, T, dtype):
    x, w, s = _data(B, T, dtype)
    got = cop.causal_conv1d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(s), window=True)
    want = ref.causal_conv1d(x, w, s, window=True)
    assert len(got) == 3
    for g, r in zip(got, want):
        assert g.dtype == torch.from_numpy(r).dtype and tuple(g.shape) == r.shape
        _close(g.numpy(), r, dtype)
    got2 = cop.causal_conv1d(torch.from_numpy(x), torch.from_numpy(w)[:, None, :], torch.from_numpy(s))
    assert len(got2) == 2
    for g, r in zip(got2, want[:2]):
        _close(g.numpy(), r, dtype)


# ----------------------------------------------------------------------------- export + ONNX Runtime
class _Wrap(torch.nn.Module):
    def __init__(self, w, window):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)
        self.window = window

    def forward(self, x, conv_state):
        return cop.causal_conv1d(x, self.w, conv_state, window=self.window)


def _export(window: bool, dtype):
    _, w, _ = _data(1, 1, dtype, seed=7)
    x, _, s = _data(2, 5, dtype)
    Bd, Td = torch.export.Dim("B"), torch.export.Dim("T")
    prog = torch.onnx.export(_Wrap(torch.from_numpy(w), window), (torch.from_numpy(x), torch.from_numpy(s)),
                             dynamo=True, dynamic_shapes=({0: Bd, 1: Td}, {0: Bd}),
                             input_names=["x", "conv_state"], verbose=False)
    model = prog.model_proto
    opset = next(o.version for o in model.opset_import if o.domain == "")
    model.functions.extend(cfn.onnx_functions(opset))
    return model, w


@pytest.fixture(scope="module", params=[(False, np.float32), (True, np.float32), (False, np.float16),
                                        (True, np.float16)], ids=lambda p: f"window{int(p[0])}-{p[1].__name__}")
def exported(request):
    window, dtype = request.param
    model, w = _export(window, dtype)
    return window, dtype, model, w


def test_export_single_node(exported):
    window, dtype, model, _ = exported
    op_type = cfn.OP_TYPE_WINDOW if window else cfn.OP_TYPE
    custom = [n for n in model.graph.node if n.domain == cfn.DOMAIN]
    assert len(custom) == 1 and custom[0].op_type == op_type
    assert [n.op_type for n in model.graph.node] == [op_type]
    assert {a.name: a.i for a in custom[0].attribute} == {"channels": C}
    assert any(o.domain == cfn.DOMAIN for o in model.opset_import)
    assert len(custom[0].output) == (3 if window else 2)
    onnx.checker.check_model(model)
    # batch and time stay symbolic
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param and dims[2].dim_value == C


def test_onnxruntime_matches_reference(exported):
    window, dtype, model, w = exported
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for B, T in [(1, 1), (3, 7), (1, 63), (3, 65), (2, 130)]:
        x, _, s = _data(B, T, dtype, seed=3)
        got = sess.run(None, {"x": x, "conv_state": s})
        want = ref.causal_conv1d(x, w, s, window=window)
        assert len(got) == len(want)
        for g, r in zip(got, want):
            assert g.dtype == r.dtype and g.shape == r.shape
            _close(g, r, dtype)


def test_functions_are_well_formed():
    fns = cfn.onnx_functions(21)
    assert [(f.domain, f.name) for f in fns] == [(cfn.DOMAIN, cfn.OP_TYPE), (cfn.DOMAIN, cfn.OP_TYPE_WINDOW)]
    for f in fns:
        assert {(o.domain, o.version) for o in f.opset_import} == {("", 21)}
        assert list(f.input) == ["x", "weight", "conv_state"]
        assert "Cast" not in [n.op_type for n in f.node]
