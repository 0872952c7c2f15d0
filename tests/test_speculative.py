"""Speculative decoding is exact: greedy output token-identical to the target model alone.

Pairs: a tiny dense drafter (its own random weights: nearly every draft rejected) for a tiny MoE target
with the published attention geometry (other head counts than the drafter's), the target drafting for
itself (every draft accepted), and a drafter that always proposes a wrong token. The reference is a
plain greedy loop over the target alone, with no marks and no rollback.
"""
from __future__ import annotations

import numpy as np
import pytest

from dualbrain.runtime.sampling import SamplingParams
from dualbrain.runtime.solver.speculative import speculative_generate


class _WrongDrafter:
    """The target's own next-token choice shifted by one id: every draft is wrong."""

    def __init__(self, model):
        self.model = model
        self.eos_ids = model.eos_ids

    def new_state(self, *a, **kw):
        return self.model.new_state(*a, **kw)

    def forward(self, ids, state, **kw):
        return np.roll(self.model.forward(ids, state, **kw), 1, axis=-1)


@pytest.fixture(scope="module")
def pair(artifacts):
    from dualbrain.runtime.model import Model

    large = Model.load(artifacts.export(artifacts.checkpoint("moe", "causal", attention="published")))
    small = Model.load(artifacts.export(artifacts.checkpoint("dense", "conditional", seed=5)))
    assert (large.spec.num_heads, large.spec.head_dim) != (small.spec.num_heads, small.spec.head_dim)
    return large, small


def _plain_greedy(model, prompt, n):
    state = model.new_state(1, capacity=len(prompt) + n + 1)
    logits = model.forward(np.asarray([prompt], np.int64), state)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0])))
        if out[-1] in model.eos_ids:
            break
        logits = model.forward(np.asarray([[out[-1]]], np.int64), state)
    return out


@pytest.mark.parametrize("prompt_len", [1, 9, 33])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_is_token_identical_to_the_target(pair, prompt_len, k):
    large, small = pair
    prompt = [int(x) for x in np.random.default_rng(prompt_len).integers(0, large.vocab_size, prompt_len)]
    params = SamplingParams(greedy=True, max_new_tokens=64)
    ref = _plain_greedy(large, prompt, 64)
    for drafter, rate in ((small, None), (large, 1.0), (_WrongDrafter(large), 0.0)):
        res = speculative_generate(large, drafter, prompt, params, draft_tokens=k)
        assert res.new_ids == ref
        if rate is not None and res.drafted:
            assert res.acceptance_rate == rate


def _same_as_fresh(model, state, seq):
    """`state` holds exactly `seq`'s prefix of its length: one more token gives the logits a fresh
    prefill of that prefix gives (no marks, no rollback)."""
    n = int(state.positions[0])
    fresh = model.new_state(1, capacity=n + 2)
    model.forward(np.asarray([seq[:n]], np.int64), fresh)
    z = np.asarray([[seq[0]]], np.int64)
    return np.allclose(model.forward(z, state), model.forward(z, fresh), rtol=1e-4, atol=1e-4), n


def test_rolled_back_states_equal_a_fresh_prefill(pair):
    large, small = pair
    prompt = [int(x) for x in np.random.default_rng(4).integers(0, large.vocab_size, 12)]
    res = speculative_generate(large, small, prompt, SamplingParams(greedy=True, max_new_tokens=40), draft_tokens=3)
    seq = prompt + res.new_ids
    for model, state in ((large, res.target_state), (small, res.draft_state)):
        ok, n = _same_as_fresh(model, state, seq)
        assert len(seq) - 2 <= n <= len(seq) and ok


def test_sampling_runs_seeded_and_reproducible(pair):
    large, small = pair
    params = SamplingParams(seed=3, max_new_tokens=24)
    a = speculative_generate(large, small, [5, 6, 7], params, draft_tokens=3)
    b = speculative_generate(large, small, [5, 6, 7], params, draft_tokens=3)
    assert a.new_ids == b.new_ids and 1 <= len(a.new_ids) <= 24 and a.drafted > 0
