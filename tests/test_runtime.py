"""The runtime: no torch/transformers, EOS and stop strings, streaming, chat, JSON CLI output."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dualbrain.cli import main

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def exported(artifacts):
    return artifacts.export(artifacts.checkpoint("moe", "conditional"))


def test_runtime_never_imports_torch_or_transformers(exported):
    code = f"""
import sys
from dualbrain.runtime.model import Model
from dualbrain.runtime.generate import generate
from dualbrain.runtime.sampling import SamplingParams
m = Model.load({str(exported)!r})
ids = m.tokenizer.encode(m.tokenizer.render([{{"role": "user", "content": "hi"}}]))
g = generate(m, [ids], SamplingParams(max_new_tokens=5, seed=1, stop=("zz",)))
heavy = [k for k in ("torch", "transformers", "tensorrt", "tensorrt_rtx", "triton") if k in sys.modules]
print(heavy, len(g[0].new_ids))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().startswith("[]"), res.stdout + res.stderr


def test_generate_json_contract(exported):
    res = CliRunner().invoke(main, ["generate", str(exported), "--prompt", "Hello there", "--greedy",
                                    "--max-new-tokens", "12", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for key in ("new_ids", "text", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in d
    assert 1 <= len(d["new_ids"]) <= 12
    assert d["prefill_tokens_per_s"] > 0


def test_generate_ids_matches_api(exported):
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    res = CliRunner().invoke(main, ["generate", str(exported), "--ids", "5,17,300", "--greedy",
                                    "--max-new-tokens", "10", "--json"])
    d = json.loads(res.output)
    m = Model.load(exported)
    g = generate(m, [[5, 17, 300]], SamplingParams(greedy=True, max_new_tokens=10))[0]
    assert d["new_ids"] == g.new_ids
    assert d["text"] == m.tokenizer.decode(g.new_ids, skip_special_tokens=True)


def test_stops_on_eos(exported):
    """Force EOS: when the greedy token is an EOS id, generation ends there and includes it."""
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    m = Model.load(exported)
    g = generate(m, [[5, 17, 300]], SamplingParams(greedy=True, max_new_tokens=40))[0]
    # pretend the 4th generated token is EOS
    m2 = Model.load(exported)
    m2.spec = dataclasses.replace(m2.spec, eos_token_ids=(g.new_ids[3],))
    g2 = generate(m2, [[5, 17, 300]], SamplingParams(greedy=True, max_new_tokens=40))[0]
    first = g.new_ids.index(g.new_ids[3])
    assert g2.new_ids == g.new_ids[: first + 1] and g2.finish_reason == "eos"


def test_stop_string_and_streaming(exported):
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    m = Model.load(exported)
    full = generate(m, [[5, 17, 300]], SamplingParams(greedy=True, max_new_tokens=30))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    streamed = []
    g = generate(m, [[5, 17, 300]], SamplingParams(greedy=True, max_new_tokens=30, stop=(stop,)),
                 on_token=lambda row, tok, delta: streamed.append(delta))[0]
    assert g.finish_reason == "stop"
    assert stop not in g.text and full.text.startswith(g.text)
    assert "".join(streamed).startswith(g.text)


def test_sampling_is_seeded(exported):
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    m = Model.load(exported)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=3, max_new_tokens=20)
    a = generate(m, [[5, 17, 300]], p)[0].new_ids
    b = generate(m, [[5, 17, 300]], p)[0].new_ids
    c = generate(m, [[5, 17, 300]], p.replace(seed=4))[0].new_ids
    assert a == b and a != c


def test_state_is_per_generation(exported):
    """Two interleaved generations from one loaded model do not disturb each other."""
    from dualbrain.runtime.generate import decode_one, prefill
    from dualbrain.runtime.model import Model

    m = Model.load(exported)
    s1, l1 = prefill(m, [[1, 2, 3]])
    s2, l2 = prefill(m, [[9, 8, 7, 6]])
    a = decode_one(m, s1, l1.argmax(-1))
    s1b, l1b = prefill(m, [[1, 2, 3]])
    np.testing.assert_array_equal(a, decode_one(m, s1b, l1b.argmax(-1)))
