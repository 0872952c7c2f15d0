import json

import numpy as np
import pytest

from dualbrain.errors import DualbrainError
from dualbrain.runtime.sampling import (
    NON_THINKING,
    THINKING,
    Sampler,
    SamplingParams,
    default_params,
    filtered_probs,
)


def _hf_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    scores = torch.from_numpy(logits.astype(np.float64))
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    warpers = [tr.TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(tr.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(tr.TopPLogitsWarper(p.top_p))
    for w in warpers:
        scores = w(ids, scores)
    return torch.softmax(scores, dim=-1).numpy()


SETTINGS = [
    dict(temperature=0.6, top_p=0.95, top_k=20),
    dict(temperature=0.7, top_p=0.8, top_k=20),
    dict(temperature=1.0, top_p=1.0, top_k=0),
    dict(temperature=1.3, top_p=0.5, top_k=0),
    dict(temperature=0.3, top_p=1.0, top_k=5),
    dict(temperature=2.0, top_p=0.9, top_k=3000),
    dict(temperature=0.9, top_p=0.01, top_k=50),
]


@pytest.mark.parametrize("V", [1, 7, 1001])
@pytest.mark.parametrize("setting", SETTINGS)
def test_filtered_probs_match_transformers(V, setting):
    rng = np.random.default_rng(V * 31 + len(str(setting)))
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    p = SamplingParams(**setting)
    ours = filtered_probs(logits, p)
    ref = _hf_probs(logits, p)
    assert ours.shape == (4, V)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-9)


def test_filtered_probs_float16_and_1d():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float16)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=10)
    ours = filtered_probs(logits, p)
    np.testing.assert_allclose(ours, _hf_probs(logits[None].astype(np.float32), p), atol=1e-6)


def test_presence_penalty_equals_subtraction():
    rng = np.random.default_rng(1)
    B, V = 3, 40
    logits = rng.standard_normal((B, V)).astype(np.float32)
    mask = rng.random((B, V)) < 0.3
    for pen in (1.5, -0.7, 2.0):
        p = SamplingParams(temperature=0.9, top_p=1.0, top_k=0, presence_penalty=pen)
        ours = filtered_probs(logits, p, mask)
        adj = logits.astype(np.float64).copy()
        for b in range(B):
            for v in range(V):
                if mask[b, v]:
                    adj[b, v] -= pen
        z = adj / 0.9
        ref = np.exp(z - z.max(-1, keepdims=True))
        ref /= ref.sum(-1, keepdims=True)
        np.testing.assert_allclose(ours, ref, atol=1e-12)
        # With filters too: same as filtering the manually penalised logits without a mask.
        p2 = p.replace(top_k=10, top_p=0.7)
        np.testing.assert_allclose(
            filtered_probs(logits, p2, mask),
            filtered_probs(adj, p2.replace(presence_penalty=0.0)),
            atol=1e-12,
        )


def test_sampler_records_generated_tokens_for_penalty():
    V = 5
    logits = np.array([[5.0, 0, 0, 0, 0]], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=1, presence_penalty=2.0, seed=0), 1)
    assert s(logits).tolist() == [0]  # top_k=1 -> deterministic
    assert s.presence[0].tolist() == [True, False, False, False, False]
    # penalty lowers token 0 to 3.0, still the max
    assert s(logits).tolist() == [0]
    logits2 = np.array([[5.0, 4.0, 0, 0, 0]], dtype=np.float32)
    assert s(logits2).tolist() == [1]  # 5-2 = 3 < 4
    s.observe(np.array([[1, 4, -1]]))
    assert s.presence[0].tolist() == [True, True, False, False, True]
    s.reset()
    assert s.presence is None
    s2 = Sampler(SamplingParams(seed=0), 2)
    s2.observe(np.array([3, 4]), vocab_size=V)
    assert s2.presence.sum() == 2


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 101)).astype(np.float32)
    logits[0, 10] = logits[0, 50] = 100.0  # tie -> lowest id
    expected = np.argmax(logits, -1)
    assert expected[0] == 10
    for p in (SamplingParams(greedy=True), SamplingParams(temperature=0.0)):
        s = Sampler(p, 6)
        for _ in range(3):
            ids = s(logits)
            assert ids.dtype == np.int64
            np.testing.assert_array_equal(ids, expected)
        probs = filtered_probs(logits, p)
        np.testing.assert_array_equal(probs.argmax(-1), expected)
        np.testing.assert_allclose(probs.sum(-1), 1.0)


def test_sampling_frequencies_match_filtered_probs():
    rng = np.random.default_rng(3)
    V, N, B = 8, 20000, 4
    row = rng.standard_normal(V).astype(np.float32) * 1.5
    logits = np.tile(row, (B, 1))
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=6, seed=123)
    probs = filtered_probs(row, p)[0]
    s = Sampler(p, B)
    counts = np.zeros(V)
    for _ in range(N // B):
        np.add.at(counts, s(logits), 1)
    freq = counts / counts.sum()
    assert np.max(np.abs(freq - probs)) < 0.02
    assert np.all(counts[probs == 0] == 0)  # filtered tokens are never drawn
    # Chi-square over the kept tokens, generous bound.
    kept = probs > 0
    exp = probs[kept] * counts.sum()
    chi2 = np.sum((counts[kept] - exp) ** 2 / exp)
    assert chi2 < 3 * kept.sum() + 20


def test_seed_determinism():
    rng = np.random.default_rng(4)
    seq = [rng.standard_normal((3, 64)).astype(np.float32) for _ in range(30)]
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=0, presence_penalty=1.0, seed=7)

    def run(params):
        s = Sampler(params, 3)
        return np.stack([s(x) for x in seq])

    a, b = run(p), run(p)
    np.testing.assert_array_equal(a, b)
    c = run(p.replace(seed=8))
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("presence_penalty", float("nan")),
        ("max_new_tokens", 0),
        ("max_new_tokens", 1.5),
        ("seed", -1),
        ("seed", 1.0),
        ("greedy", "yes"),
        ("stop", ("",)),
        ("stop", (1,)),
    ],
)
def test_invalid_params_raise(name, value):
    with pytest.raises(DualbrainError) as ei:
        SamplingParams(**{name: value})
    msg = str(ei.value)
    assert name in msg and "\n" not in msg
    with pytest.raises(DualbrainError, match=name):
        THINKING.replace(**{name: value})


def test_valid_edge_params_and_replace():
    SamplingParams(temperature=0, top_p=1.0, top_k=0, presence_penalty=-2.0, seed=0, max_new_tokens=1)
    p = SamplingParams(stop=["</s>", "\n\n"])
    assert p.stop == ("</s>", "\n\n")
    hash(p)
    q = NON_THINKING.replace(temperature=None, top_k=5, seed=None)
    assert q.temperature == 0.7 and q.top_k == 5 and q.seed is None
    assert NON_THINKING.replace() == NON_THINKING
    with pytest.raises(DualbrainError, match="bogus"):
        NON_THINKING.replace(bogus=1)


def test_presets():
    assert (THINKING.temperature, THINKING.top_p, THINKING.top_k, THINKING.presence_penalty) == (
        0.6, 0.95, 20, 0.0)
    assert (NON_THINKING.temperature, NON_THINKING.top_p, NON_THINKING.top_k,
            NON_THINKING.presence_penalty) == (0.7, 0.8, 20, 1.5)
    assert not THINKING.greedy and not NON_THINKING.greedy


def test_default_params(tmp_path):
    assert default_params(None, thinking=True) == THINKING
    assert default_params(None, thinking=False) == NON_THINKING
    assert default_params({}, thinking=False) == NON_THINKING
    cfg = {"do_sample": True, "temperature": 0.9, "top_p": 0.7, "top_k": 40,
           "repetition_penalty": 1.1, "bos_token_id": 1}
    p = default_params(cfg, thinking=True)
    assert (p.temperature, p.top_p, p.top_k, p.greedy) == (0.9, 0.7, 40, False)
    assert p.presence_penalty == 0.0  # from the thinking preset; repetition_penalty ignored
    p = default_params({"temperature": 1.0, "presence_penalty": 0.5}, thinking=False)
    assert (p.temperature, p.top_p, p.top_k, p.presence_penalty) == (1.0, 0.8, 20, 0.5)
    p = default_params({"do_sample": False, "temperature": 0.6}, thinking=False)
    assert p.greedy and p.is_greedy
    with pytest.raises(DualbrainError, match="top_p"):
        default_params({"top_p": 0}, thinking=True)
    # A model directory also works.
    assert default_params(tmp_path, thinking=True) == THINKING
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert default_params(str(tmp_path), thinking=True).greedy
