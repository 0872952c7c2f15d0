"""Triton gated delta rule kernels (plugins/gated_delta/triton.py) vs the NumPy reference.

Both the recurrent kernel and the chunked (chunk 64, WY/UT form) kernels are run on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported); skipped when
triton is not installed.  The interpreter costs milliseconds per op and per program, so the
shape matrix keeps B * Hv * T small while still covering tails, GQA-style head sharing, value
blocks with a masked remainder and odd head sizes (dk=16, dv=24)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dualbrain.plugins.gated_delta import reference as ref  # noqa: E402
from dualbrain.plugins.gated_delta import triton as gtri  # noqa: E402

DK, DV = 16, 24


def _data(B, T, Hk, Hv, seed=0):
    """float32 (q, k, v, g, beta, state) like the op receives them (q scaled by DK**-0.5)."""
    rng = np.random.default_rng(seed + 7919 * B + 31 * T + Hk + 101 * Hv)
    return ref.random_inputs(rng, B, T, Hk, Hv, DK, DV)


def _t(xs):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in xs]


def _close(got, want, tol):
    got = np.asarray(got.numpy() if hasattr(got, "numpy") else got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


TOL = {"recurrent": 1e-5, "chunked": 1e-4}

# (T, B, Hk, Hv, block_v): every T of the op tests, both head layouts, a masked second value block
CASES = [
    (1, 3, 2, 4, None), (1, 1, 2, 2, 16),
    (7, 3, 2, 4, None), (7, 1, 2, 2, 16),
    (63, 1, 2, 2, None), (63, 1, 1, 2, 16),
    (65, 1, 2, 4, None), (65, 3, 1, 1, None),
    (130, 1, 2, 2, None), (130, 1, 1, 1, 16),
]


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
@pytest.mark.parametrize("T,B,Hk,Hv,block_v", CASES)
def test_matches_reference(mode, T, B, Hk, Hv, block_v):
    x = _data(B, T, Hk, Hv)
    o, S = gtri.gated_delta_rule(*_t(x), mode=mode, block_v=block_v)
    ro, rS = ref.gated_delta_rule(*x)
    assert o.dtype == S.dtype == torch.float32
    _close(o, ro, TOL[mode])
    _close(S, rS, TOL[mode])


@pytest.mark.parametrize("T,B,Hk,Hv", [(1, 3, 2, 4), (7, 3, 2, 4), (20, 1, 2, 2)])
def test_window_matches_reference(T, B, Hk, Hv):
    x = _data(B, T, Hk, Hv, seed=1)
    o, S, Ss = gtri.gated_delta_rule(*_t(x), window=True)
    ro, rS, rSs = ref.gated_delta_rule(*x, window=True)
    _close(o, ro, 1e-5)
    _close(S, rS, 1e-5)
    _close(Ss, rSs, 1e-5)


def test_dispatch():
    x = _t(_data(1, 17, 1, 1))
    outs = (torch.empty(1, 17, 1, DV), torch.empty(1, 1, DK, DV))
    assert gtri.gated_delta_rule_triton(*x, *outs) == "chunked"
    y = [a[:, :16] if a.dim() > 3 or a.shape[1] == 17 else a for a in x[:5]] + [x[5]]
    outs = (torch.empty(1, 16, 1, DV), torch.empty(1, 1, DK, DV))
    assert gtri.gated_delta_rule_triton(*y, *outs) == "recurrent"
    ws = (torch.empty(1, 17, 1, DV), torch.empty(1, 1, DK, DV), torch.empty(1, 17, 1, DK, DV))
    assert gtri.gated_delta_rule_triton(*x, *ws) == "recurrent"  # window is always recurrent
    with pytest.raises(ValueError):
        gtri.gated_delta_rule_triton(*x, *ws, mode="chunked")
    assert gtri.chunk_workspace_numel(2, 17, 4, DK, DV) == 2 * 17 * 4 * (DK + DV)


@pytest.mark.parametrize("mode,T", [("recurrent", 7), ("chunked", 70)])
def test_preallocated_inplace_strided(mode, T):
    """q/k/v as non-contiguous views of one packed projection (as in the model), out_state aliasing
    state (in-place update), outputs and workspace supplied by the caller."""
    B, Hk, Hv = 1, 1, 2
    q, k, v, g, beta, s = _data(B, T, Hk, Hv, seed=2)
    packed = torch.zeros((B, T, 2 * Hk * DK + Hv * DV + 8))
    packed[..., :Hk * DK] = torch.from_numpy(q).reshape(B, T, -1)
    packed[..., Hk * DK:2 * Hk * DK] = torch.from_numpy(k).reshape(B, T, -1)
    packed[..., 2 * Hk * DK:2 * Hk * DK + Hv * DV] = torch.from_numpy(v).reshape(B, T, -1)
    qv = packed[..., :Hk * DK].unflatten(-1, (Hk, DK))
    kv = packed[..., Hk * DK:2 * Hk * DK].unflatten(-1, (Hk, DK))
    vv = packed[..., 2 * Hk * DK:2 * Hk * DK + Hv * DV].unflatten(-1, (Hv, DV))
    assert not vv.is_contiguous()
    gb = torch.from_numpy(np.stack([g, beta], -1))  # g, beta strided views too
    state = torch.from_numpy(s).clone()
    o = torch.full((B, T, Hv, DV), float("nan"))
    ws = torch.empty(gtri.chunk_workspace_numel(B, T, Hv, DK, DV) + 5)
    used = gtri.gated_delta_rule_triton(qv, kv, vv, gb[..., 0], gb[..., 1], state, o, state,
                                        mode=mode, workspace=ws)
    assert used == mode
    ro, rS = ref.gated_delta_rule(q, k, v, g, beta, s)
    _close(o, ro, TOL[mode])
    _close(state, rS, TOL[mode])


def test_chunked_ill_conditioned():
    """Nearly identical keys, beta = 1, almost no decay: (I + L) is far from identity."""
    rng = np.random.default_rng(3)
    T = 70
    k0 = ref.l2_normalise(rng.standard_normal(DK))
    k = ref.l2_normalise(k0 + 0.01 * rng.standard_normal((1, T, 1, DK)))
    x = [k * DK ** -0.5, k, rng.standard_normal((1, T, 1, DV)), np.full((1, T, 1), -1e-3),
         np.ones((1, T, 1)), rng.standard_normal((1, 1, DK, DV))]
    x = [a.astype(np.float32) for a in x]
    o, S = gtri.gated_delta_rule(*_t(x), mode="chunked")
    ro, rS = ref.gated_delta_rule(*x)
    _close(o, ro, 1e-4)
    _close(S, rS, 1e-4)


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_empty_t_keeps_state(mode):
    x = _data(2, 0, 1, 2)
    o, S = gtri.gated_delta_rule(*_t(x), mode=mode)
    assert o.shape == (2, 0, 2, DV)
    np.testing.assert_array_equal(S.numpy(), x[5])
