"""The step engine: continuous batching gives every request exactly its solo tokens.

The reference (`_solo`) is the request alone in a plain loop written here: one-shot prefill, then one
token at a time with its own sampler, stopping on EOS, a stop string or the token limit. The engine
prefills in chunks on a one-row state, moves it into a batch row, and decodes rows of different ages
together."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from dualbrain.errors import DualbrainError  # noqa: E402
from dualbrain.runtime.engine import Engine, Generation  # noqa: E402
from dualbrain.runtime.generate import decode_one, generate, prefill  # noqa: E402
from dualbrain.runtime.model import Model  # noqa: E402
from dualbrain.runtime.sampling import Sampler, SamplingParams  # noqa: E402


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(artifacts, request):
    return Model.load(artifacts.export(artifacts.checkpoint(request.param, "conditional")))


def _solo(model, prompt, params):
    tok, eos = model.tokenizer, set(model.eos_ids)
    state, logits = prefill(model, [prompt])
    sampler, g = Sampler(params, 1), Generation(list(prompt))
    while True:
        t = int(sampler(logits)[0])
        g.new_ids.append(t)
        g.text = tok.decode(g.new_ids, skip_special_tokens=True)
        hit = [g.text.find(s) for s in params.stop if s in g.text]
        if t in eos:
            g.finish_reason = "eos"
        elif hit:
            g.finish_reason, g.text = "stop", g.text[:min(hit)]
        elif len(g.new_ids) >= params.max_new_tokens:
            g.finish_reason = "length"
        if g.finish_reason:
            return g
        logits = decode_one(model, state, np.array([t]))


def _requests(model):
    rng = np.random.default_rng(21)
    P = SamplingParams
    specs = [  # (prompt length, params, submitted at step)
        (5, P(greedy=True, max_new_tokens=12), 0),
        (40, P(greedy=True, max_new_tokens=6), 0),           # long: prefilled in 5 chunks
        (3, P(temperature=0.9, top_p=0.9, top_k=50, seed=1, max_new_tokens=10), 0),
        (11, P(temperature=1.2, top_p=1.0, top_k=0, presence_penalty=1.5, seed=7, max_new_tokens=15), 1),
        (7, P(greedy=True, max_new_tokens=20), 3),            # cancelled after 4 tokens
        (2, P(temperature=0.7, seed=3, max_new_tokens=9), 5),
        (17, P(greedy=True, max_new_tokens=1), 6),
        (9, P(temperature=0.8, seed=11, max_new_tokens=14), 9),
    ]
    reqs = [(list(rng.integers(0, model.vocab_size, n)), p, at) for n, p, at in specs]
    # a stop string taken from the middle of one request's own solo text: it must stop there alone too
    prompt, params, at = reqs[5]
    text = _solo(model, prompt, params).text
    if len(text) > 6:
        reqs[5] = (prompt, params.replace(stop=(text[3:5],)), at)
    return reqs


def test_continuous_batching_gives_solo_tokens(model):
    reqs = _requests(model)
    want = [_solo(model, p, params) for p, params, _ in reqs]
    engine = Engine(model, max_batch=3, prefill_chunk=8)
    handles = [None] * len(reqs)
    cancel_at, cancelled = 4, 4
    step = 0
    while step < 500 and (step < 10 or not engine.idle):
        for i, (p, params, at) in enumerate(reqs):
            if at == step:
                handles[i] = engine.submit(p, params)
        h = handles[cancelled]
        if h is not None and not h.done and len(h.generation.new_ids) >= cancel_at:
            h.cancel()
        engine.step()
        step += 1
    assert engine.idle
    for i, (h, w) in enumerate(zip(handles, want)):
        g = h.result()
        if i == cancelled:
            assert g.finish_reason == "cancelled" and g.new_ids == w.new_ids[:len(g.new_ids)]
            assert cancel_at <= len(g.new_ids) < len(w.new_ids)
        else:
            assert (g.new_ids, g.finish_reason, g.text) == (w.new_ids, w.finish_reason, w.text), i
    assert want[5].finish_reason == "stop" or len(want[5].text) <= 6


def test_generate_is_the_engine_and_matches_the_plain_loop(model):
    prompts = [[5, 17, 300], [9] * 12, [1, 2]]
    for params in (SamplingParams(greedy=True, max_new_tokens=9), SamplingParams(seed=4, max_new_tokens=7)):
        streamed = {r: [] for r in range(3)}
        gens = generate(model, prompts, params, on_token=lambda r, t, d: streamed[r].append(d))
        for r, (p, g) in enumerate(zip(prompts, gens)):
            want = _solo(model, p, params)
            assert (g.new_ids, g.finish_reason, g.text) == (want.new_ids, want.finish_reason, want.text)
            assert "".join(streamed[r]) == g.text


def test_streaming_yields_each_token_and_the_text(model):
    engine = Engine(model, max_batch=2)
    prompt = [5, 17, 300, 42]
    req = engine.submit(prompt, SamplingParams(greedy=True, max_new_tokens=10))
    other = engine.submit([9, 9, 9], SamplingParams(seed=2, max_new_tokens=7))
    events = list(req)
    g = req.result()
    assert [t for t, _ in events][:len(g.new_ids)] == g.new_ids
    assert "".join(d for _, d in events) == model.tokenizer.decode(g.new_ids, skip_special_tokens=True)
    assert g.new_ids == _solo(model, prompt, SamplingParams(greedy=True, max_new_tokens=10)).new_ids
    assert other.result().new_ids == _solo(model, [9, 9, 9], SamplingParams(seed=2, max_new_tokens=7)).new_ids


def test_background_thread_serves_submitters_on_other_threads(model):
    params = [SamplingParams(seed=s, max_new_tokens=8) for s in range(6)]
    prompts = [[3 + i, 100 + i, 7] for i in range(6)]
    results = [None] * 6
    with Engine(model, max_batch=4) as engine:
        def client(i):
            results[i] = engine.submit(prompts[i], params[i]).result(timeout=120)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(6):
        assert results[i].new_ids == _solo(model, prompts[i], params[i]).new_ids


def test_async_iteration(model):
    engine = Engine(model, max_batch=2)

    async def run():
        req = engine.submit([1, 2, 3], SamplingParams(greedy=True, max_new_tokens=5))
        return [t async for t, _ in req]

    toks = asyncio.run(run())
    assert toks[:5] == _solo(model, [1, 2, 3], SamplingParams(greedy=True, max_new_tokens=5)).new_ids


def test_admission_waits_for_a_row_and_refuses_what_never_fits_in_kv_memory(model):
    probe = Engine(model, max_batch=2)
    per = probe.kv_bytes_per_position * 2            # one position of both rows
    engine = Engine(model, max_batch=2, kv_bytes=per * 20)
    a = engine.submit([5] * 6, SamplingParams(greedy=True, max_new_tokens=10))
    b = engine.submit([6] * 6, SamplingParams(greedy=True, max_new_tokens=4))
    c = engine.submit([7] * 12, SamplingParams(greedy=True, max_new_tokens=8))     # 20 positions: just fits
    for _ in range(3):
        engine.step()
    assert a.row is not None and b.row is not None and c.row is None and not c.done    # no free row yet
    assert c.result().new_ids == _solo(model, [7] * 12, SamplingParams(greedy=True, max_new_tokens=8)).new_ids
    assert a.result().new_ids == _solo(model, [5] * 6, SamplingParams(greedy=True, max_new_tokens=10)).new_ids
    with pytest.raises(DualbrainError, match="MiB of KV cache"):
        engine.submit([1] * 15, SamplingParams(max_new_tokens=10))                # 25 positions: never
    assert engine.idle


# ---- dualbrain generate --batch ------------------------------------------------------------------

def _cli(*args):
    from click.testing import CliRunner

    from dualbrain.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_batch_file(model, tmp_path):
    import json

    lines = [
        {"ids": [5, 17, 300], "greedy": True, "max_new_tokens": 6},
        {"prompt": "Hello there", "greedy": True, "max_new_tokens": 5, "think": False},
        {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.9, "seed": 3, "max_new_tokens": 4},
        {"ids": [9, 9], "seed": 5, "top_k": 0, "top_p": 1.0, "stop": "a", "max_new_tokens": 8},
    ]
    f = tmp_path / "reqs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]))
    res = _cli("generate", model.dir, "--batch", f, "--max-batch", 2, "--json")
    assert res.exit_code == 0, res.output
    out = [json.loads(x) for x in res.output.strip().splitlines()]
    assert [o["index"] for o in out] == [0, 1, 2, 3]
    from dualbrain.runtime.requests import read_requests

    for o, spec in zip(out, read_requests(f)):
        ids = spec.prompt_ids(model)
        want = _solo(model, ids, spec.params(model.generation_config))
        assert (o["new_ids"], o["text"], o["finish_reason"], o["prompt_tokens"]) == \
            (want.new_ids, want.text, want.finish_reason, len(ids))
        assert o["prefill_tokens_per_s"] > 0


@pytest.mark.parametrize("bad, message", [
    ('{"ids": [1, 2]}\n{"ids": [1, 2]', "line 2: not valid JSON"),
    ('{"ids": [1]}\n\n{"prompt": "x", "ids": [1]}', "line 3: give exactly one of prompt, messages or ids"),
    ('{"ids": [1], "temprature": 0.5}', "line 1: unknown field 'temprature'"),
    ('{"ids": [1], "temperature": -1}', "line 1: invalid sampling parameter temperature"),
    ('{"ids": [1]}\n{"ids": [1, 99999999]}', "line 2: token id 99999999 is outside the vocabulary"),
    ('{"ids": []}', "line 1: ids must be a non-empty list"),
    ('', "has no requests"),
])
def test_generate_batch_bad_line_runs_nothing(model, tmp_path, bad, message):
    f = tmp_path / "reqs.jsonl"
    f.write_text(bad)
    res = _cli("generate", model.dir, "--batch", f, "--json")
    assert res.exit_code == 2 and message in res.output, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error: ")


def test_backend_call_limits_cap_prefill_chunks_and_rows(model, monkeypatch):
    """A backend that takes at most N new positions per call (TensorRT engines: their profile's
    maximum) gets prompts in chunks of at most N, with the same tokens; more rows than its engines
    hold are refused."""
    widths = []
    real = model.forward

    def spy(ids, state, **kw):
        widths.append(np.shape(ids)[1])
        return real(ids, state, **kw)
    monkeypatch.setattr(model.backend, "max_new_positions", 4, raising=False)
    monkeypatch.setattr(model.backend, "max_batch", 2, raising=False)
    monkeypatch.setattr(model, "forward", spy)
    prompt, params = list(range(3, 14)), SamplingParams(greedy=True, max_new_tokens=5)
    gen = generate(model, [prompt], params)[0]
    assert max(widths) == 4 and gen.new_ids == _solo(model, prompt, params).new_ids
    with pytest.raises(DualbrainError, match="more rows than the engines"):
        Engine(model, max_batch=3)
