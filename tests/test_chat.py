"""Runtime tokenizer + chat template: parity with transformers, streaming, sandbox, determinism."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import unicodedata

import pytest

from dualbrain.errors import DualbrainError
from dualbrain.exporter.tiny import tokenizer_json, write_tokenizer
from dualbrain.exporter.tokenizer_data import CHAT_TEMPLATE
from dualbrain.runtime.chat import StreamDecoder, Tokenizer, render_chat


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [SYSTEM, {"role": "user", "content": "What is 2+3?"}],
    "multi_turn_reasoning": [
        SYSTEM,
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "Geography question.\nEasy."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.", "reasoning_content": "Also easy."},
    ],
    "past_reasoning_then_user": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Tell me a joke"},
    ],
    "inline_think": [
        {"role": "user", "content": "Count to three"},
        {"role": "assistant", "content": "<think>\nOne, two, three.\n</think>\n\n1 2 3"},
        {"role": "user", "content": "Now backwards"},
        {"role": "assistant", "content": "<think>easy</think>3 2 1"},
    ],
    "no_reasoning_assistant": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
    "thinking_alias": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y", "thinking": "why"},
        {"role": "user", "content": "z"},
    ],
    "tools": [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is 21 degrees and sunny.", "reasoning_content": "Summarise."},
        {"role": "user", "content": "Thanks ✨ 世界"},
    ],
}
FLAGS = [
    dict(add_generation_prompt=True, enable_thinking=True, preserve_thinking=False),
    dict(add_generation_prompt=True, enable_thinking=False, preserve_thinking=False),
    dict(add_generation_prompt=True, enable_thinking=True, preserve_thinking=True),
    dict(add_generation_prompt=False, enable_thinking=False, preserve_thinking=True),
    dict(add_generation_prompt=False, enable_thinking=True, preserve_thinking=False),
]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f"{k[:3]}{int(v)}" for k, v in f.items()))
def test_render_matches_transformers(tok, hf_tok, name, flags):
    msgs = CONVERSATIONS[name]
    tools = None
    if name == "tools":
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                   "parameters": {"type": "object", "properties": {
                                                       "city": {"type": "string"}}}}}]
    expected = hf_tok.apply_chat_template(msgs, tokenize=False, tools=tools, **flags)
    kwargs = {"tools": tools} if tools else {}
    assert render_chat(tok.chat_template, msgs, **flags, **kwargs) == expected
    assert tok.render(msgs, **flags, **kwargs) == expected


def test_render_defaults_match_transformers(tok, hf_tok):
    msgs = CONVERSATIONS["multi_turn_reasoning"][:-1]
    expected = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render_chat(CHAT_TEMPLATE, msgs) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert "Geography" not in expected  # past reasoning dropped by default


def test_render_conventions():
    msgs = CONVERSATIONS["multi_turn_reasoning"][:-1]
    off = render_chat(CHAT_TEMPLATE, msgs, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    kept = render_chat(CHAT_TEMPLATE, msgs, preserve_thinking=True)
    assert ("<|im_start|>assistant\n<think>\nGeography question.\nEasy.\n</think>\n\n"
            "Paris.<|im_end|>\n") in kept
    assert render_chat(CHAT_TEMPLATE, [{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


@pytest.mark.parametrize("bad", [
    "hello",
    [],
    ["hello"],
    [{"role": "user"}],
    [{"content": "x"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": ["a", "b"]}],
    [{"role": 3, "content": "x"}],
    [{"role": "assistant", "content": "x", "reasoning_content": 5}],
    [{"role": "user", "content": "x", "extra": object()}],
])
def test_bad_messages(bad):
    with pytest.raises(DualbrainError) as e:
        render_chat(CHAT_TEMPLATE, bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{{ raise_exception('nope') }}",
    "{% for %}",
])
def test_sandbox_refuses_unsafe_templates(template):
    with pytest.raises(DualbrainError) as e:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


def test_template_helpers():
    t = "{{ messages[0] | tojson }}|{{ dict(a=1) | tojson }}{% for m in messages %}{% break %}{% endfor %}"
    out = render_chat(t, [{"role": "user", "content": "é"}])
    assert out == '{"role": "user", "content": "é"}|{"a": 1}'


TEXTS = [
    "Hello world! The quick brown fox.",
    "def add(a, b):\n    return a + b\n\n\tx = [1, 2, 3]",
    "héllo 世界 🙂 naïve café Cafe\u0301 Привет",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nyes<|im_end|>",
    "   leading and trailing spaces   \n\n\n",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text.replace("Cafe\u0301", "Café")  # NFC


def test_special_ids(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok) == 1000
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end == hf_tok.eos_token_id
    assert tok.pad_token_id == eot == hf_tok.pad_token_id
    assert tok.eos_ids == (im_end,)
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(tok.special_ids)
    # Qwen marks the think tags as added but not special: they survive skip_special_tokens
    assert "<think>" in tok.added_tokens and "<think>" not in tok.special_ids
    think = tok.encode("<think>")
    assert len(think) == 1 and tok.decode(think) == "<think>"
    assert tok.decode(tok.encode("<|im_end|>")) == ""


def test_eos_ids_from_generation_config(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [991, 989]}')
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_ids == (991, 989) and t.is_eos(989) and not t.is_eos(5)


def test_chat_template_jinja_file_preferred(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("X{{ messages[0].content }}")
    assert Tokenizer.from_dir(tmp_path).render([{"role": "user", "content": "y"}]) == "Xy"


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DualbrainError):
        Tokenizer.from_dir(tmp_path)


STREAM_TEXTS = ["héllo 世界 🙂", TEXTS[2] + " " + TEXTS[1], "🙂🙂🙂 ✨✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert all("\ufffd" not in d for d in deltas)
    if text == "héllo 世界 🙂":
        # multi-byte characters span several byte-level tokens: some pushes must hold text back
        assert len(ids) > len(text.split()) and "" in deltas[:-1]


def test_stream_decode_skips_special(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nok\n</think>\n\n世界<|im_end|>")
    dec = StreamDecoder(tok)
    out = dec.extend(ids) + dec.flush()
    assert out == tok.decode(ids) == "assistant\n<think>\nok\n</think>\n\n世界"


def test_stream_flush_incomplete(tok):
    ids = tok.encode("🙂")
    dec = tok.stream_decoder()
    partial = "".join(dec.push(i) for i in ids[:-1])
    assert partial == "" and "\ufffd" in dec.flush()


def test_tokenizer_json_deterministic():
    a = tokenizer_json()
    assert a == tokenizer_json()
    code = ("import hashlib; from dualbrain.exporter.tiny import tokenizer_json; "
            "print(hashlib.sha256(tokenizer_json().encode()).hexdigest())")
    digests = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=True)
        digests.add(res.stdout.strip())
    assert digests == {hashlib.sha256(a.encode()).hexdigest()}


def test_runtime_chat_imports_no_torch():
    code = ("import sys; import dualbrain.runtime.chat; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
