"""The runtime's KV cache (runtime/state.py): appended in place, fed back without copies, grown on demand.

Decoding from a 1-position cache that has to grow gives exactly the logits of a cache preallocated for
the whole run; the past is fed as a view of the buffer, and a step only appends its own row. (That the
K/V themselves are right is checked against transformers in test_parity.)
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dualbrain.errors import DualbrainError
from dualbrain.runtime.manifest import load_manifest
from dualbrain.runtime.model import Model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def exported(artifacts):
    return artifacts.export(artifacts.checkpoint("dense", "causal"))


def _decode(model, state, prompt, steps):
    logits = [model.forward(np.asarray([prompt]), state)]
    for _ in range(steps):
        logits.append(model.forward(logits[-1].argmax(-1).reshape(1, 1), state))
    return np.stack(logits)


def test_grown_cache_gives_the_same_logits(exported):
    model = Model.load(exported)
    prompt = [7, 300, 12, 999, 5, 41, 2]
    small, big = model.new_state(1, capacity=1), model.new_state(1, capacity=64)
    a = _decode(model, small, prompt, 20)
    b = _decode(model, big, prompt, 20)
    np.testing.assert_array_equal(a, b)
    assert small.length == big.length == len(prompt) + 20
    assert small.capacity >= small.length and big.capacity == 64
    att = next(i for i, blk in enumerate(model.layers) if blk.kind == "full_attention")
    np.testing.assert_array_equal(small.feeds(att)["past_key"], big.feeds(att)["past_key"])


def test_cache_is_fed_without_copies_and_a_step_only_appends(exported):
    model = Model.load(exported, linked=False)
    att = next(i for i, blk in enumerate(model.layers) if blk.kind == "full_attention")
    block = model.layers[att]
    state = model.new_state(2, capacity=16)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.vocab_size, (2, 5))
    pad = np.ones((2, 5), np.int64)
    pad[1, :2] = 0                              # row 1 left-padded
    model.forward(ids, state, pad=pad)
    feeds = state.feeds(att)
    buf = state.layers[att]["past_key"]
    assert np.shares_memory(feeds["past_key"], buf) and feeds["past_key"].flags.c_contiguous
    assert feeds["past_key"].shape == (5, 2) + tuple(block.state[0].shape[2:])
    np.testing.assert_array_equal(state.mask, pad)
    np.testing.assert_array_equal(state.positions, [5, 3])
    # the next step writes row 5 and leaves rows 0..4 as they were
    tok = rng.integers(0, model.vocab_size, (2, 1))
    before = {k: v.copy() for k, v in state.feeds(att).items()}
    model.forward(tok, state)
    assert state.length == 6
    np.testing.assert_array_equal(state.feeds(att)["past_key"][:5], before["past_key"])
    assert np.abs(state.feeds(att)["past_key"][5]).sum() > 0
    np.testing.assert_array_equal(state.positions, [6, 4])


def test_state_grows_only_up_to_max_context(exported):
    model = Model.load(exported)
    state = model.new_state(1, capacity=10 ** 9)
    assert state.capacity == model.max_context
    with pytest.raises(DualbrainError, match="maximum context"):
        model.forward(np.zeros((1, model.max_context + 1), np.int64), state)
    assert state.length == 0


def test_old_manifest_version_is_refused(exported, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(exported, out)
    man = json.loads((out / "manifest.json").read_text())
    man["version"] = 1
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DualbrainError, match="older dualbrain.*export the checkpoint again"):
        load_manifest(out)


def test_appended_state_must_be_sequence_major(exported, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(exported, out)
    man = json.loads((out / "manifest.json").read_text())
    att = next(b for b in man["blocks"] if b["kind"] == "full_attention")
    att["state"][0]["shape"] = ["batch", "past", 2, 32]
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DualbrainError, match="malformed state entry"):
        load_manifest(out)
