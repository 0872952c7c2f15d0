"""The speculative accept/resample rule is exact: what it emits is distributed as the target's
warped distribution, analytically (summing over the draft's outcomes) and empirically (chi-square)."""
from __future__ import annotations

import numpy as np
import pytest

from dualbrain.runtime.sampling import SamplingParams, filtered_probs
from dualbrain.runtime.solver.accept import accept_probability, residual, verify

V = 600
PARAMS = {
    "plain": SamplingParams(temperature=1.0, top_p=1.0, top_k=0),
    "qwen-defaults": SamplingParams(),                   # temperature 0.7, top_p 0.8, top_k 20
}


def _pair(seed: int, params: SamplingParams, k: int = 1):
    """Target and draft distributions at one context: random logits per position and a noisy copy of
    them, warped by the same sampling parameters, as the verify step sees them."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((k + 1, V)) * 3
    target = filtered_probs(logits, params)
    # the draft shares part of the target's logits (partial agreement, so both branches have mass)
    draft = filtered_probs(0.8 * logits[:k] + rng.standard_normal((k, V)) * 1.5, params)
    return target, draft


def _first_token_analytic(p0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """P(first emitted = x), summing over the draft d ~ q1: accepted (x = d) or rejected (x ~ residual)."""
    a = np.array([accept_probability(p0, q1, d) if q1[d] > 0 else 0.0 for d in range(len(p0))])
    return q1 * a + (1.0 - float(np.sum(q1 * a))) * residual(p0, q1)


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_token_distribution_is_the_target_analytically(name, seed):
    p, q = _pair(seed, PARAMS[name])
    got = _first_token_analytic(p[0], q[0])
    assert np.abs(got - p[0]).max() <= 1e-9
    # and the draft really differs from the target (else the check would be vacuous)
    assert np.abs(q[0] - p[0]).sum() > 0.5


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Chi-square p-value of observed `counts` against `probs`, the smallest bins merged until each
    expects >= 5; and the number of bins."""
    from scipy.stats import chisquare

    n = counts.sum()
    expected = probs * n
    obs_bins, exp_bins, o, e = [], [], 0.0, 0.0
    for i in np.argsort(expected):
        o, e = o + counts[i], e + expected[i]
        if e >= 5:
            obs_bins.append(o), exp_bins.append(e)
            o, e = 0.0, 0.0
    if e > 0:
        obs_bins[-1] += o
        exp_bins[-1] += e
    return float(chisquare(obs_bins, exp_bins)[1]), len(exp_bins)


@pytest.mark.parametrize("name", list(PARAMS))
def test_emitted_tokens_pass_chi_square(name):
    p, q = _pair(7, PARAMS[name], k=2)
    rng = np.random.default_rng(1234)
    n = 6000
    first = np.zeros(V)
    accepted = 0
    for _ in range(n):
        d = [int(rng.choice(V, p=q[i])) for i in range(2)]
        v = verify(d, q, p, rng)
        assert len(v.tokens) == v.accepted + 1
        first[v.tokens[0]] += 1
        accepted += v.accepted
    pvalue, bins = _chi_square(first, p[0])
    assert bins >= 5
    assert pvalue > 0.001, f"chi-square p = {pvalue:.2e} over {bins} bins"
    assert 0 < accepted < 2 * n             # both branches ran


def test_greedy_is_the_target_argmax():
    rng = np.random.default_rng(0)
    greedy = SamplingParams(greedy=True)
    for _ in range(50):
        p = filtered_probs(rng.standard_normal((4, 50)), greedy)
        q = filtered_probs(rng.standard_normal((3, 50)), greedy)
        drafts = [int(np.argmax(x)) for x in q]
        v = verify(drafts, q, p, rng)
        want = [int(np.argmax(x)) for x in p]
        n = next((i for i, d in enumerate(drafts) if d != want[i]), 3)
        assert v.accepted == n and v.tokens == want[:n + 1]


def test_wrong_shapes_refused():
    p = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="2 drafts need 2 draft and 3 target"):
        verify([0, 1], p, p, np.random.default_rng(0))


@pytest.mark.parametrize("name", list(PARAMS))
def test_a_model_verify_step_is_exact(artifacts, monkeypatch, name):
    """The distributions a real verify step sees (the small model's q, the large model's p, captured
    from the engine's speculative mode at a fixed context): the first emitted token is distributed as
    the large model's warped distribution there, analytically (<= 1e-9) and over 4000 seeded draws."""
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.solver import speculative
    from dualbrain.runtime.solver.drafters import ModelDrafter

    large = Model.load(artifacts.export(artifacts.checkpoint("moe", "causal", attention="published")))
    small = Model.load(artifacts.export(artifacts.checkpoint("dense", "conditional", seed=5)))
    seen, real = [], speculative.verify
    monkeypatch.setattr(speculative, "verify", lambda d, q, p, rng: seen.append((q.copy(), p.copy())) or real(d, q, p, rng))
    params = PARAMS[name].replace(seed=11, max_new_tokens=3)
    prompt = [int(x) for x in np.random.default_rng(5).integers(0, large.vocab_size, 7)]
    engine = Engine(large, max_batch=1, mode=speculative.SpeculativeDecode(ModelDrafter(small), 1, adaptive=False))
    gen = engine.submit(prompt, params).result()
    q, p = seen[0]
    # p[0] is the large model alone's warped distribution after the context (prompt + first token)
    state = large.new_state(1, capacity=16)
    alone = filtered_probs(large.forward(np.asarray([prompt + gen.new_ids[:1]], np.int64), state), params)[0]
    np.testing.assert_allclose(p[0], alone, atol=1e-5)
    assert np.abs(q[0] - p[0]).sum() > 0.5               # the drafter really differs
    assert np.abs(_first_token_analytic(p[0], q[0]) - p[0]).max() <= 1e-9
    rng = np.random.default_rng(99)
    first = np.zeros(len(p[0]))
    for _ in range(4000):
        v = real([int(rng.choice(len(q[0]), p=q[0]))], q[:1], p[:2], rng)
        first[v.tokens[0]] += 1
    pvalue, bins = _chi_square(first, p[0])
    assert bins >= 2 and pvalue > 0.001, f"chi-square p = {pvalue:.2e} over {bins} bins"
