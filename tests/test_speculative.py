"""Speculative decoding (a small model or the MTP head drafts) is exact, per row inside a batch.

Greedy output must be token-identical to the large model alone; the reference is a plain greedy
loop over the large model with no engine, marks or rollback. Pairs: a tiny dense drafter (its own
random weights: nearly every draft rejected) for a tiny MoE target with the published attention
geometry (other head counts than the drafter's); the target drafting for itself (every draft
accepted); a drafter that always proposes a wrong token (every draft rejected); the MoE model's own
MTP head (both ways of feeding it). Requests of different prompt lengths share a batch, more of them
than rows, so rows verify different numbers of drafts in one call and join and leave mid-run.
"""
from __future__ import annotations

import numpy as np
import pytest

from dualbrain.runtime.engine import Engine
from dualbrain.runtime.sampling import SamplingParams
from dualbrain.runtime.solver.drafters import ModelDrafter, MtpDrafter
from dualbrain.runtime.solver.speculative import SpeculativeDecode, speculative_generate

NEW = 64
GREEDY = SamplingParams(greedy=True, max_new_tokens=NEW)


class WrongDrafter(ModelDrafter):
    """Proposes the model's own next-token choice shifted by one id: every draft is wrong."""

    def next_logits(self, feed):
        return {r: np.roll(x, 1) for r, x in super().next_logits(feed).items()}


@pytest.fixture(scope="module")
def pair(artifacts):
    from dualbrain.runtime.model import Model

    large = Model.load(artifacts.export(artifacts.checkpoint("moe", "causal", attention="published")))
    small = Model.load(artifacts.export(artifacts.checkpoint("dense", "conditional", seed=5)))
    assert (large.spec.num_heads, large.spec.head_dim) != (small.spec.num_heads, small.spec.head_dim)
    return large, small


@pytest.fixture(scope="module")
def mtp_large(artifacts):
    from dualbrain.runtime.model import Model

    model = Model.load(artifacts.export(artifacts.checkpoint("moe")))
    assert model.manifest.side("mtp") is not None
    return model


def plain_greedy(model, prompt, n=NEW):
    state = model.new_state(1, capacity=len(prompt) + n + 1)
    logits = model.forward(np.asarray([prompt], np.int64), state)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0])))
        if out[-1] in model.eos_ids:
            break
        logits = model.forward(np.asarray([[out[-1]]], np.int64), state)
    return out


def prompts(model, lengths=(1, 9, 33, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.vocab_size, n).tolist() for n in lengths]


def run(model, mode, ps, params=GREEDY, max_batch=3):
    engine = Engine(model, max_batch=max_batch, prefill_chunk=16, mode=mode)
    reqs = [engine.submit(p, params) for p in ps]
    return [r.result() for r in reqs]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_speculative_greedy_is_token_identical_to_the_large_model(pair, max_batch):
    large, small = pair
    ps = prompts(large)
    refs = [plain_greedy(large, p) for p in ps]
    cases = ((ModelDrafter(small), 4, None), (ModelDrafter(small), 1, None),
             (ModelDrafter(large), 4, 1.0), (WrongDrafter(large), 3, 0.0))
    for drafter, k, rate in cases:
        gens = run(large, SpeculativeDecode(drafter, k), ps, max_batch=max_batch)
        assert [g.new_ids for g in gens] == refs, (type(drafter).__name__, k)
        assert all(g.drafted > 0 for g in gens)
        if rate is not None:
            assert all(g.acceptance_rate == rate for g in gens), [g.acceptance_rate for g in gens]
    # the self-drafter accepts everything, so adaptive k stays at the maximum: far fewer rounds than tokens
    assert all(g.rounds < len(g.new_ids) / 2 for g in run(large, SpeculativeDecode(ModelDrafter(large), 4), ps))


@pytest.mark.parametrize("feed", ["final-normed", "pre-norm"])
@pytest.mark.parametrize("max_batch", [1, 3])
def test_mtp_greedy_is_token_identical_to_the_large_model(mtp_large, feed, max_batch):
    ps = prompts(mtp_large, seed=1)
    refs = [plain_greedy(mtp_large, p) for p in ps]
    gens = run(mtp_large, SpeculativeDecode(MtpDrafter(mtp_large, feed=feed), 3), ps, max_batch=max_batch)
    assert [g.new_ids for g in gens] == refs
    assert all(g.drafted > 0 for g in gens)


def live_rows(engine, steps):
    """Step the engine `steps` times; after each step yield every live (row, its kept sequence)."""
    for _ in range(steps):
        engine.step()
        for row, req in enumerate(engine.rows):
            if req is not None:
                yield row, req.generation.prompt_ids + req.generation.new_ids


def _same_rows(state, row, fresh, n):
    """Row `row` of `state` holds what row 0 of `fresh` holds over n positions: GDN states, K/V slots."""
    for layer, fresh_layer, blk in zip(state.layers, fresh.layers, state._blocks):
        for s in blk.state:
            a, b = layer[s.input], fresh_layer[s.input]
            got, want = (a[:n, row], b[:n, 0]) if s.append else (a[row], b[0])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{blk.name}.{s.input}")


def test_rolled_back_rows_equal_a_fresh_prefill(pair):
    """Mid-run, after rounds with rejections, each live row of both models' states equals a fresh
    prefill of exactly the tokens that row has kept (it fails if either model's rollback is removed)."""
    large, small = pair
    drafter = ModelDrafter(small)
    engine = Engine(large, max_batch=2, mode=SpeculativeDecode(drafter, 3))
    for p in prompts(large, (12, 5), seed=4):
        engine.submit(p, SamplingParams(greedy=True, max_new_tokens=40))
    checked = 0
    for row, seq in live_rows(engine, 10):
        for model, state in ((large, engine.state), (small, drafter.state)):
            n = int(state.positions[row])
            assert n == int(state.lengths[row]) and len(seq) - 3 <= n < len(seq)
            fresh = model.new_state(1, capacity=n + 1)
            model.forward(np.asarray([seq[:n]], np.int64), fresh)
            _same_rows(state, row, fresh, n)
            checked += 1
    assert checked >= 20


def test_mtp_cache_holds_the_true_pairs_only(mtp_large):
    """After rounds of chained drafts, the head's cache holds exactly the pairs (target hidden state at
    j, token j+1) of the kept tokens, as one fresh call over them computes."""
    model = mtp_large
    drafter = MtpDrafter(model)
    engine = Engine(model, max_batch=2, mode=SpeculativeDecode(drafter, 3))
    for p in prompts(model, (11, 4), seed=2):
        engine.submit(p, SamplingParams(greedy=True, max_new_tokens=40))
    last = len(model.layers) - 1
    checked = 0
    for row, seq in live_rows(engine, 8):
        n = int(drafter.state.positions[row])
        assert 0 < n < len(seq)
        hidden = model.step(np.asarray([seq[:n]], np.int64), model.new_state(1, n + 1),
                            hidden_after=(last,)).hidden_after[last]
        fresh = drafter._new_state(1, n + 1)
        drafter._run(fresh, {0: (hidden[0], seq[1:n + 1])}, drafter.normalize)
        _same_rows(drafter.state, row, fresh, n)
        checked += 1
    assert checked >= 8


def test_sampling_is_seeded_and_reproducible(pair):
    large, small = pair
    params = SamplingParams(seed=3, max_new_tokens=24, presence_penalty=0.5)
    a = speculative_generate(large, small, [5, 6, 7], params, draft_tokens=3)
    b = speculative_generate(large, small, [5, 6, 7], params, draft_tokens=3)
    assert a.new_ids == b.new_ids and 1 <= len(a.new_ids) <= 24 and a.drafted > 0
    c = speculative_generate(large, small, [5, 6, 7], params.replace(seed=4), draft_tokens=3)
    assert c.new_ids != a.new_ids


def test_a_row_finishing_mid_round_frees_its_row(pair):
    """Tokens past a row's limit or EOS are never emitted, and the row is free for the next request."""
    large, small = pair
    ps = prompts(large, (3, 7, 2), seed=9)
    params = [SamplingParams(greedy=True, max_new_tokens=n) for n in (5, 2, 9)]
    engine = Engine(large, max_batch=1, mode=SpeculativeDecode(ModelDrafter(large), 4))
    reqs = [engine.submit(p, q) for p, q in zip(ps, params)]
    gens = [r.result() for r in reqs]
    assert [g.new_ids for g in gens] == [plain_greedy(large, p, q.max_new_tokens) for p, q in zip(ps, params)]
    assert engine.idle and engine.rows == [None]
