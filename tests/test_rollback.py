"""Per-row state: rows of different ages in one call, rollback to any position since a mark, ragged
(right-padded) calls, rows inserted and evicted, and the linked graph's last-N logits.

The reference for every case is the same model fed each row alone, from scratch, with exactly the
tokens that row should have seen (the models themselves are checked against transformers in
test_parity)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("torch")

from dualbrain.runtime.model import Model  # noqa: E402

FAMILIES = ["dense", "moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(artifacts, request):
    layout = "causal" if request.param == "dense" else "conditional"
    return artifacts.export(artifacts.checkpoint(request.param, layout))


def _solo_logits(model, ids):
    """Logits after feeding `ids` to a fresh one-row state, and that state."""
    st = model.new_state(1)
    return model.forward(np.asarray([ids]), st)[0], st


def _prefill(model, prompts, capacity=64):
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), np.int64)
    pad = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], pad[i, longest - len(p):] = p, 1
    st = model.new_state(len(prompts), capacity=capacity)
    st.last_logits = model.forward(ids, st, pad=pad)
    return st


def _close(a, b, tol=1e-5):
    scale = max(float(np.abs(b).max()), 1e-30)
    assert float(np.abs(a - b).max()) / scale <= tol


@pytest.mark.parametrize("linked", [True, False])
def test_linked_last_n_logits_equal_the_per_block_path(exported, linked):
    model, blocks = Model.load(exported, linked=linked), Model.load(exported, linked=False)
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, model.vocab_size, (2, 9))
    sa, sb = model.new_state(2), blocks.new_state(2)
    for ids, n in ((prompt, 5), (rng.integers(0, model.vocab_size, (2, 1)), 1),
                   (rng.integers(0, model.vocab_size, (2, 7)), 7)):
        ra, rb = model.step(ids, sa, logits_to_keep=n), blocks.step(ids, sb, logits_to_keep=n)
        assert ra.logits.shape == (2, n, model.vocab_size) and ra.hidden.shape == (2, n, model.spec.hidden_size)
        _close(ra.logits, rb.logits, 1e-6)
        _close(ra.hidden, rb.hidden, 1e-6)
    full = blocks.forward(prompt, blocks.new_state(2), all_logits=True)
    np.testing.assert_allclose(model.forward(prompt, model.new_state(2), logits_to_keep=4), full[:, -4:],
                               rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("multi_token", [True, False], ids=["one-call", "single-token-calls"])
@pytest.mark.parametrize("linked", [True, False])
def test_rollback_to_every_position(exported, multi_token, linked):
    """After a mark and T tokens per row, rolling each row back to any n in 0..T (different per row)
    gives the next logits of a row that only ever saw prompt + those n tokens."""
    model = Model.load(exported, linked=linked)
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(0, model.vocab_size, n)) for n in (5, 9, 2)]
    T = 5
    drafts = rng.integers(0, model.vocab_size, (3, T))
    nxt = rng.integers(0, model.vocab_size, (3, 1))
    state = _prefill(model, prompts)
    state.mark()
    if multi_token:
        model.forward(drafts, state)
    else:
        for j in range(T):
            model.forward(drafts[:, j:j + 1], state)
    assert [state.tokens_since_mark(r) for r in range(3)] == [T] * 3
    for k in range(T + 1):
        keep = [k, T - k, (2 * k + 1) % (T + 1)]
        st = copy.deepcopy(state)
        for r, n in enumerate(keep):
            st.rollback(r, n)
        np.testing.assert_array_equal(st.positions, [len(p) + n for p, n in zip(prompts, keep)])
        got = model.forward(nxt, st)
        for r, n in enumerate(keep):
            want, _ = _solo_logits(model, prompts[r] + list(drafts[r, :n]) + [int(nxt[r, 0])])
            _close(got[r], want)


def test_rollback_twice_and_continue(exported):
    """Roll back, decode on, mark again, roll back again: still the solo logits."""
    model = Model.load(exported)
    rng = np.random.default_rng(2)
    prompt = list(rng.integers(0, model.vocab_size, 6))
    state = _prefill(model, [prompt, prompt[:3]])
    seen = [prompt, prompt[:3]]
    for keep in ((2, 0), (3, 1)):
        state.mark()
        drafts = rng.integers(0, model.vocab_size, (2, 4))
        model.forward(drafts, state)
        for r, n in enumerate(keep):
            state.rollback(r, n)
            seen[r] = seen[r] + list(drafts[r, :n])
    tok = rng.integers(0, model.vocab_size, (2, 1))
    got = model.forward(tok, state)
    for r in range(2):
        _close(got[r], _solo_logits(model, seen[r] + [int(tok[r, 0])])[0])


def test_ragged_right_padded_call_gives_solo_logits(exported):
    """Rows with different numbers of new tokens in one call (right-padded): each row's logits at its
    last real token, and its state afterwards, are its solo ones."""
    model = Model.load(exported)
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(0, model.vocab_size, n)) for n in (4, 7, 3, 5)]
    new = [3, 1, 4, 0]                   # the last row takes no token in this call
    T = max(new)
    ids = rng.integers(0, model.vocab_size, (4, T))
    pad = np.array([[1] * n + [0] * (T - n) for n in new])
    state = _prefill(model, prompts)
    logits = model.forward(ids, state, pad=pad, logits_to_keep=T)
    np.testing.assert_array_equal(state.positions, [len(p) + n for p, n in zip(prompts, new)])
    tok = rng.integers(0, model.vocab_size, (4, 1))
    after = model.forward(tok, state)
    for r, n in enumerate(new):
        seen = prompts[r] + list(ids[r, :n])
        if n:
            _close(logits[r, n - 1], _solo_logits(model, seen)[0])
        _close(after[r], _solo_logits(model, seen + [int(tok[r, 0])])[0])


def _greedy_solo(model, prompt, steps):
    logits, st = _solo_logits(model, prompt)
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = model.forward(np.array([[out[-1]]]), st)[0]
    return out


def test_insert_and_evict_rows_give_solo_tokens(exported):
    """A row evicted mid-generation and a new request inserted in its place (prefilled on its own, so
    the rows now differ in age): every request, and the rows around it, get exactly their solo greedy
    tokens."""
    model = Model.load(exported)
    rng = np.random.default_rng(3)
    prompts = {k: list(rng.integers(0, model.vocab_size, n)) for k, n in zip("abcd", (6, 3, 8, 5))}
    steps, cancel = 8, 3
    want = {k: _greedy_solo(model, p, steps) for k, p in prompts.items()}
    st = _prefill(model, [prompts[k] for k in "abc"])
    logits = st.last_logits
    rows = ["a", "b", "c"]
    got = {k: [] for k in prompts}
    for step in range(steps):
        toks = logits.argmax(-1)
        if step == cancel:                 # "b" is cancelled: evict its row, admit "d" there
            st.evict(1)
            d_logits, d_state = _solo_logits(model, prompts["d"])
            st.insert(1, d_state)
            rows[1] = "d"
            toks[1] = d_logits.argmax()
        for r, k in enumerate(rows):
            got[k].append(int(toks[r]))
        logits = model.forward(toks.reshape(-1, 1), st)
    assert got["a"] == want["a"] and got["c"] == want["c"]
    assert got["b"] == want["b"][:cancel] and got["d"] == want["d"][:steps - cancel]
