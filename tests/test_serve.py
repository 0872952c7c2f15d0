"""`dualbrain serve`, single process: the shared client tests (serve_cases.py) on a live server, and what
only this server shows -- /metrics after a disconnect, the bounded queue, logprobs, n, stop strings, the
reasoning and tool-call parsers (crafted outputs, split across chunks), SIGTERM draining, the CLI."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")

from serve_cases import (KEY, MAX_BODY, Live, UvicornThread, chat_ids, free_port, openai,  # noqa: E402
                         solo)
from serve_cases import *  # noqa: E402,F401,F403  (the shared client tests)

from dualbrain.runtime.serve.api import ApiSettings, ModelInfo, build_app  # noqa: E402
from dualbrain.runtime.serve.output import ChatOutput  # noqa: E402
from dualbrain.runtime.serve.server import local_app  # noqa: E402
from dualbrain.runtime.serve.service import Delta, Final, ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def export(artifacts):
    return artifacts.export(artifacts.checkpoint("moe"))


@pytest.fixture(scope="module")
def reference(export):
    from dualbrain.runtime.model import Model

    return Model.load(export)


def _start(export, reference, *, max_batch=4, max_queue=64, name="tiny-moe"):
    app, service = local_app(ServeConfig(str(export), max_batch=max_batch, max_queue=max_queue, ort_threads=1),
                             ApiSettings(api_key=KEY, max_body=MAX_BODY), name)
    port = free_port()
    return UvicornThread(app, port), service, Live(f"http://127.0.0.1:{port}", name, export, reference)


@pytest.fixture(scope="module")
def served(export, reference):
    server, service, live = _start(export, reference)
    yield live, service
    server.stop()


@pytest.fixture(scope="module")
def live(served):
    return served[0]


def _metric(live, name: str) -> float:
    text = httpx.get(live.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# ---- only the single-process server ------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_row(served):
    live, service = served
    cancelled = _metric(live, "dualbrain_requests_cancelled_total")
    engine, held, go = service.engine, threading.Event(), threading.Event()
    step = engine.step

    def held_step():       # the engine's own thread stops between steps once the request has its row
        if any(r is not None for r in engine.rows) and not go.is_set():
            held.set()
            go.wait(30)
        return step()
    engine.step = held_step
    try:
        with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60, json={"prompt": "Once upon a time", "max_tokens": 400, "stream": True,
                                            "temperature": 0}) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data:"))
            assert held.wait(10)                     # mid-generation
            try:
                assert _metric(live, "dualbrain_requests_running") == 1
                assert _metric(live, "dualbrain_batch_occupancy") == 1 / service.engine.max_batch
            finally:
                r.close()                            # the client hangs up
                time.sleep(0.5)
                go.set()                             # its row frees at the next step
    finally:
        go.set()
        del engine.step
    deadline = time.time() + 10
    while _metric(live, "dualbrain_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(live, "dualbrain_requests_running") == 0 and service.engine.idle
    assert _metric(live, "dualbrain_requests_cancelled_total") == cancelled + 1
    text = httpx.get(live.url + "/metrics").text
    for name in ("dualbrain_requests_waiting", "dualbrain_prompt_tokens_total", "dualbrain_generation_tokens_total",
                 "dualbrain_time_to_first_token_seconds_bucket", "dualbrain_time_per_output_token_seconds_bucket"):
        assert name in text


def test_full_queue_answers_503_with_retry_after(export, reference):
    from dualbrain.runtime.sampling import SamplingParams

    server, service, live = _start(export, reference, max_batch=1, max_queue=1, name="small")
    try:
        service.engine.stop()                    # nothing moves: the one queue place stays taken
        held = service.engine.submit([1, 2, 3], SamplingParams(greedy=True, max_new_tokens=2))
        busy = live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"
        service.engine.start()
        held.result(30)
        assert live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_logprobs_n_and_stop_strings(live):
    c = live.client()
    r = c.chat.completions.create(model=live.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5 and all(len(t.top_logprobs) == 3 for t in lp)
    assert all(t.token == t.top_logprobs[0].token and t.logprob <= 0 for t in lp)     # greedy: the top one
    r = c.completions.create(model=live.name, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.tokens) == 4 and "".join(r.choices[0].logprobs.tokens) == r.choices[0].text

    r = c.completions.create(model=live.name, prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=5)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 18
    chunks = list(c.completions.create(model=live.name, prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=5,
                                       stream=True))
    for ch in r.choices:
        assert "".join(x.choices[0].text for x in chunks if x.choices[0].index == ch.index) == ch.text

    full = c.completions.create(model=live.name, prompt="The robot", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.find(stop)]
    r = c.completions.create(model=live.name, prompt="The robot", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model=live.name, prompt="The robot", max_tokens=30, temperature=0,
                                       stop=stop, stream=True))
    assert "".join(x.choices[0].text for x in chunks) == cut           # nothing of the stop string streamed


def test_generate_cli_gives_the_same_tokens(live):
    ids = chat_ids(live, "Hello! Who are you?", thinking=False)
    out = subprocess.run([sys.executable, "-m", "dualbrain.cli", "generate", str(live.export), "--prompt",
                          "Hello! Who are you?", "--no-think", "--greedy", "--max-new-tokens", "12", "--json"],
                         capture_output=True, text=True, check=True)
    want = json.loads(out.stdout)["new_ids"]
    r = live.client().chat.completions.create(
        model=live.name, messages=[{"role": "user", "content": "Hello! Who are you?"}], max_tokens=12, temperature=0,
        extra_body={"return_token_ids": True, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].token_ids == want == solo(live, ids, 12)


def test_chat_template_kwargs_and_tools_reach_the_template(live):
    tok, c = live.reference.tokenizer, live.client()
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
            {"role": "user", "content": "And now?"}]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    for kwargs, extra in (({"enable_thinking": False}, {}), ({"preserve_thinking": True}, {}),
                          ({}, {"tools": tools}), ({}, {"tools": tools, "tool_choice": "none"})):
        r = c.chat.completions.create(model=live.name, messages=msgs, max_tokens=1, temperature=0, **extra,
                                      extra_body={"chat_template_kwargs": kwargs, "return_token_ids": True})
        rendered = tok.render(msgs, **kwargs, **({"tools": tools} if extra.get("tool_choice") == "auto" or
                                                 (extra and "tool_choice" not in extra) else {}))
        assert r.model_extra["prompt_token_ids"] == tok.encode(rendered), (kwargs, extra)


# ---- reasoning and tool calls, on crafted model outputs ------------------------------------------------
QWEN35_CALL = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
               "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n"
               "</function>\n</tool_call>")
QWEN3_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
         "get_time": {}}


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("seed", range(20))
def test_reasoning_and_tool_calls_split_anywhere(seed):
    rng = random.Random(seed)
    cases = [  # (prompt opens <think>, tools, output) -> (reasoning, content, calls)
        (True, None, "I should greet.\n</think>\n\nHello!", ("I should greet.\n", "Hello!", [])),
        (False, None, "<think>\nHmm.\n</think>\n\nHi <thin", ("Hmm.\n", "Hi <thin", [])),
        (False, None, "No thinking here.", ("", "No thinking here.", [])),
        (True, TOOLS, "Weather?\n</think>\n\n" + QWEN35_CALL,
         ("Weather?\n", "Let me check.\n\n", [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})])),
        (False, TOOLS, QWEN3_CALL, ("", "", [("get_weather", {"city": "Paris", "days": 3})])),
        (False, TOOLS, "<tool_call>\nnot a call\n</tool_call>", ("", "<tool_call>\nnot a call\n</tool_call>", [])),
        (False, TOOLS, "cut short <tool_call>\n{\"name\"", ("", "cut short <tool_call>\n{\"name\"", [])),
    ]
    for thinking, tools, text, (reasoning, content, calls) in cases:
        out = ChatOutput(thinking=thinking, tools=tools)
        parts = [out.feed(piece) for piece in _split(text, rng)] + [out.flush()]
        assert "".join(p.reasoning for p in parts) == reasoning
        assert "".join(p.content for p in parts) == content
        assert [(n, json.loads(a)) for p in parts for n, a in p.tool_calls] == calls


class ScriptedBackend:
    """A backend that streams a crafted output in small pieces (what a trained model would write)."""

    def __init__(self, text: str):
        self.text = text

    async def stream(self, prompt_ids, params, logprobs=None):
        pieces = [self.text[i:i + 3] for i in range(0, len(self.text), 3)]
        for i, piece in enumerate(pieces):
            yield Delta([i], piece)
        yield Final("eos", len(prompt_ids), len(pieces))

    def metrics_text(self):
        return b""


def test_reasoning_and_tool_calls_through_the_api(export):
    info = ModelInfo.read(str(export), "scripted")
    scripted = ScriptedBackend("<think>\nThe user wants weather.\n</think>\n\n" + QWEN35_CALL)
    server = UvicornThread(build_app(scripted, info), port := free_port())
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        tools = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in TOOLS.items()]
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model="scripted", messages=msgs, tools=tools)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert m.model_extra["reasoning_content"] == "The user wants weather.\n" and m.content == "Let me check.\n\n"
        assert [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == \
            [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]
        chunks = list(c.chat.completions.create(model="scripted", messages=msgs, tools=tools, stream=True))
        deltas = [x.choices[0].delta for x in chunks if x.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The user wants weather.\n"
        calls = [t for d in deltas for t in d.tool_calls or []]
        assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather"), (1, "get_time")]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the tool's answer comes back as a role: tool message, rendered through the template
        msgs += [m.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": m.tool_calls[0].id,
                                                   "content": "sunny"}]
        assert c.chat.completions.create(model="scripted", messages=msgs, tools=tools).choices[0].message.tool_calls
        # without tools the same output is plain content
        r = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert "<tool_call>" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    finally:
        server.stop()


# ---- the command ---------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_and_exits_0(export):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dualbrain.cli", "serve", str(export), "--port", str(port),
                             "--max-batch", "2", "--ort-threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 120, "stream": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data:"):])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_refuses_bad_setups(tmp_path, export):
    from click.testing import CliRunner

    from dualbrain.cli import main

    for args, msg in ([str(tmp_path), "--port", "1"], "not an export"), \
            ([str(export), "--replicas", "2"], "need --ray"), \
            ([str(export), "--small", str(export)], "need --mode"):
        r = CliRunner().invoke(main, ["serve", *args])
        assert r.exit_code == 2 and msg in r.output, r.output


def test_a_served_pair_runs_its_solver_mode(export, reference):
    """--small S_OUT --mode speculative: every request runs speculatively (exact: greedy tokens are the
    large model's alone); logprobs are refused there for now."""
    app, service = local_app(ServeConfig(str(export), small_dir=str(export), mode="speculative", max_batch=2,
                                         ort_threads=1), ApiSettings(api_key=KEY, max_body=MAX_BODY), "pair")
    port = free_port()
    server = UvicornThread(app, port)
    try:
        live = Live(f"http://127.0.0.1:{port}", "pair", export, reference)
        ids = reference.tokenizer.encode("The robot")
        r = live.client().completions.create(model="pair", prompt=ids, max_tokens=12, temperature=0,
                                             extra_body={"return_token_ids": True})
        assert r.choices[0].token_ids == solo(live, ids, 12)
        assert live.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "logprobs": 1}).status_code == 400
    finally:
        server.stop()


def test_ray_scale_flags():
    from dualbrain.errors import DualbrainError
    from dualbrain.runtime.serve.ray_app import Scale

    config = ServeConfig("out", max_batch=4, max_queue=8)
    assert Scale.parse(None, None).options(config)["num_replicas"] == 1
    assert Scale.parse(3, None).options(config)["max_ongoing_requests"] == 12
    auto = Scale.parse(None, "1:4").options(config)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 4)
    for replicas, autoscale in ((0, None), (2, "1:2"), (None, "3:1"), (None, "x")):
        with pytest.raises(DualbrainError):
            Scale.parse(replicas, autoscale)


def test_disconnect_with_n_choices_leaves_the_engine_idle(served):
    live, service = served
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"prompt": "Once", "max_tokens": 450, "n": 3, "stream": True, "temperature": 1.0}) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
    deadline = time.time() + 10
    while not service.engine.idle and time.time() < deadline:
        time.sleep(0.05)
    assert service.engine.idle
    assert live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
