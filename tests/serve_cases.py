"""The `dualbrain serve` client tests, run with the official `openai` client against a live server: the
single-process one (test_serve.py) and the Ray Serve one with 2 replicas (test_serve_ray.py) import them
and define the `live` fixture (a `Live`). Not collected on its own (no test_ prefix).
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "sk-test"
MAX_BODY = 64 * 1024


@dataclass
class Live:
    url: str                 # http://127.0.0.1:PORT
    name: str                # the served model name
    export: Path
    reference: object        # a Model loaded here, for `dualbrain generate`'s tokens

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def async_client(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, timeout=60, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """An app under uvicorn on a background thread (the single-process server, in this process)."""

    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def solo(live: Live, ids: list[int], max_tokens: int) -> list[int]:
    """What `dualbrain generate --greedy` gives for this prompt alone."""
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.sampling import SamplingParams

    return generate(live.reference, [ids], SamplingParams(greedy=True, max_new_tokens=max_tokens))[0].new_ids


def chat_ids(live: Live, text: str, thinking: bool = True) -> list[int]:
    tok = live.reference.tokenizer
    return tok.encode(tok.render([{"role": "user", "content": text}], enable_thinking=thinking))


PROMPTS = ["Hello! Who are you?", "What is the capital of France?", "Write a poem about the sea.",
           "def fibonacci(n):", "Count the clouds one by one.", "Why do robots write poems?",
           "Tell me a story about a cat.", "2 + 3 ="]


# ---- the cases --------------------------------------------------------------------------------------
def test_models_and_health(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [live.name]
    assert httpx.get(live.url + "/health").status_code == 200


def test_chat_and_completions(live):
    c = live.client()
    text = PROMPTS[1]
    ids = chat_ids(live, text)
    want = solo(live, ids, 9)
    r = c.chat.completions.create(model=live.name, messages=[{"role": "user", "content": text}], max_tokens=9,
                                  temperature=0, extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids == want and ch.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.usage.total_tokens == len(ids) + len(want)
    assert ch.message.content == live.reference.tokenizer.decode(want)

    stream = c.chat.completions.create(model=live.name, messages=[{"role": "user", "content": text}], max_tokens=9,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ch.message.content
    assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)

    # completions: a string prompt and the same prompt as token ids, streamed and not
    p = "The quick brown fox"
    pids = live.reference.tokenizer.encode(p)
    want = solo(live, pids, 7)
    for prompt in (p, pids):
        r = c.completions.create(model=live.name, prompt=prompt, max_tokens=7, temperature=0,
                                 extra_body={"return_token_ids": True})
        assert r.choices[0].token_ids == want
        assert r.usage.prompt_tokens == len(pids) and r.usage.completion_tokens == len(want)
        chunks = list(c.completions.create(model=live.name, prompt=prompt, max_tokens=7, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(x.choices[0].text for x in chunks if x.choices) == r.choices[0].text
        assert chunks[-1].usage.total_tokens == len(pids) + len(want)


def test_16_concurrent_greedy_requests_get_their_solo_tokens(live):
    """16 at once (more than the rows: they queue and join as rows free), chat and completions, each with
    its own prompt and max_tokens: every one gets exactly `generate --greedy`'s tokens for it alone."""
    jobs = []
    for i in range(16):
        text, max_tokens, chat = PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 4 + 3 * i, i % 2 == 0
        ids = chat_ids(live, text) if chat else live.reference.tokenizer.encode(text)
        jobs.append((text, max_tokens, chat, ids))

    async def one(client, text, max_tokens, chat, ids):
        extra = {"return_token_ids": True}
        if chat:
            stream = await client.chat.completions.create(
                model=live.name, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=extra)
        else:
            stream = await client.completions.create(model=live.name, prompt=text, max_tokens=max_tokens,
                                                     temperature=0, stream=True, stream_options={"include_usage": True},
                                                     extra_body=extra)
        got, usage = [], None
        async for chunk in stream:
            for ch in chunk.choices:
                got += getattr(ch, "token_ids", None) or []
            usage = chunk.usage or usage
        return got, usage

    async def run():
        client = live.async_client()
        return await asyncio.gather(*(one(client, *j) for j in jobs))

    results = asyncio.run(run())
    for (text, max_tokens, chat, ids), (got, usage) in zip(jobs, results):
        want = solo(live, ids, max_tokens)
        assert got == want, (text, chat)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(want))


def test_bad_requests_get_their_status_and_a_json_error(live):
    chat, comp = "/v1/chat/completions", "/v1/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    vocab = live.reference.vocab_size
    cases = [
        (chat, dict(content=b"{not json"), 400),
        (chat, dict(json={"messages": "hi"}), 400),
        (chat, dict(json={**ok, "temperature": -1}), 400),
        (chat, dict(json={**ok, "top_p": 0}), 400),
        (chat, dict(json={**ok, "max_tokens": 0}), 400),
        (chat, dict(json={**ok, "tool_choice": "required",
                          "tools": [{"type": "function", "function": {"name": "f"}}]}), 400),
        (comp, dict(json={"prompt": list(range(live.reference.max_context + 5)), "max_tokens": 1}), 400),
        (comp, dict(json={"prompt": [1, 2, 3], "max_tokens": live.reference.max_context}), 400),
        (comp, dict(json={"prompt": [1, vocab + 7], "max_tokens": 1}), 400),
        (comp, dict(json={"prompt": [1, -1], "max_tokens": 1}), 400),
        (chat, dict(json={**ok, "model": "no-such-model"}), 404),
        (chat, dict(json=ok, headers={"Authorization": "Bearer wrong"}), 401),
        (comp, dict(json={"prompt": "x" * (MAX_BODY + 10), "max_tokens": 1}), 413),
    ]
    for path, kw, status in cases:
        r = live.post(path, **kw)
        assert r.status_code == status, (path, kw.get("json"), r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["code"]
        # and the server keeps serving
        r = live.post(comp, json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="nope", prompt="x", max_tokens=1)
