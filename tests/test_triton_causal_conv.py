"""Triton causal conv1d kernel (plugins/causal_conv/triton.py) vs the NumPy reference.

Runs the kernel on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported); skipped when triton is not installed.  Shapes are small: the interpreter is slow."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dualbrain.plugins.causal_conv import reference as ref  # noqa: E402
from dualbrain.plugins.causal_conv import triton as ctri  # noqa: E402

C, K = 40, 4  # C is not a multiple of the channel block
TS = (1, 7, 63, 65, 130)
BS = (1, 3)
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=1e-2, atol=2e-3)}


def _close(got, want, dtype=np.float32):
    got = np.asarray(got.float().numpy() if hasattr(got, "numpy") else got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    t = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=t["rtol"], atol=t["atol"] * max(1.0, np.abs(want).max()))


def _data(B, T, dtype=np.float32, c=C, k=K, seed=0):
    rng = np.random.default_rng(seed + 1000 * B + T)
    x = rng.standard_normal((B, T, c)).astype(dtype)
    w = (rng.standard_normal((c, k)) * 0.5).astype(np.float32)  # fp32 weight: rounded to x's dtype
    s = rng.standard_normal((B, c, k - 1)).astype(dtype)
    return x, w, s


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_window_matches_reference(T, B, dtype):
    x, w, s = _data(B, T, dtype)
    # block_t=64: T=65/130 still span several time blocks, with fewer (slow) interpreted programs
    y, ns, ss = ctri.causal_conv1d(_t(x), _t(w), _t(s), window=True, block_t=64)
    ry, rns, rss = ref.causal_conv1d(x, w, s, window=True)
    assert y.dtype == ns.dtype == ss.dtype == _t(x).dtype
    _close(y, ry, dtype)
    np.testing.assert_array_equal(ns.numpy(), rns)  # states are copies: exact
    np.testing.assert_array_equal(ss.numpy(), rss)


@pytest.mark.parametrize("T", (1, 2, 40))
def test_plain_and_block_sizes(T):
    """No window; several time blocks (block_t=8) and channel blocks (block_c=16, C=40 masked tail);
    T=1/2 < K-1 takes part of new_state from the old state; K=3."""
    x, w, s = _data(1, T, k=3)
    ry, rns = ref.causal_conv1d(x, w, s)
    for kw in ({}, dict(block_t=8, block_c=16)):
        y, ns = ctri.causal_conv1d(_t(x), _t(w), _t(s), **kw)
        _close(y, ry)
        np.testing.assert_array_equal(ns.numpy(), rns)


def test_launch_into_preallocated_inplace_and_strided():
    """Launch function: x a non-contiguous channel slice of a packed projection, (C, 1, K) weight,
    out_state aliasing conv_state (in-place update), outputs written into given buffers."""
    B, T = 3, 7
    x, w, s = _data(B, T)
    packed = torch.zeros((B, T, C + 24))
    packed[:, :, 8:8 + C] = _t(x)
    xv = packed[:, :, 8:8 + C]
    assert not xv.is_contiguous()
    state = _t(s).clone()
    y = torch.full((B, T, C), float("nan"))
    ss = torch.full((B, T, C, K - 1), float("nan"))
    ctri.causal_conv1d_triton(xv, _t(w).unsqueeze(1), state, y, state, ss)
    ry, rns, rss = ref.causal_conv1d(x, w, s, window=True)
    _close(y, ry)
    np.testing.assert_array_equal(state.numpy(), rns)
    np.testing.assert_array_equal(ss.numpy(), rss)


@pytest.mark.parametrize("T", (1, 2))
def test_inplace_state_short_t(T):
    """T < K-1: the new state is partly the old one shifted; in place must still be exact."""
    x, w, s = _data(2, T)
    state = _t(s).clone()
    y = torch.empty((2, T, C))
    ctri.causal_conv1d_triton(_t(x), _t(w), state, y, state)
    ry, rns = ref.causal_conv1d(x, w, s)
    _close(y, ry)
    np.testing.assert_array_equal(state.numpy(), rns)


def test_chaining_equals_one_call():
    x, w, s = _data(1, 9)
    y_all, s_all = ctri.causal_conv1d(_t(x), _t(w), _t(s))
    y1, s1 = ctri.causal_conv1d(_t(x[:, :5]), _t(w), _t(s))
    y2, s2 = ctri.causal_conv1d(_t(x[:, 5:]), _t(w), s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=0, atol=0)
    torch.testing.assert_close(s2, s_all, rtol=0, atol=0)


def test_empty_t_keeps_state():
    x, w, s = _data(2, 0)
    y, ns, ss = ctri.causal_conv1d(_t(x), _t(w), _t(s), window=True)
    assert y.shape == (2, 0, C) and ss.shape == (2, 0, C, K - 1)
    np.testing.assert_array_equal(ns.numpy(), s)
