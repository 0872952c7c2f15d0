"""The OpenAI-compatible HTTP API (FastAPI) over a backend that streams requests: the in-process
`EngineService` or, on Ray Serve, a handle to the engine replicas (ray_app.py). Everything the API
decides -- prompts, parameters, parsing, errors, SSE -- is here, so both serve the same responses.

A backend has `stream(prompt_ids, params, logprobs)` (an async iterator of `Delta`s and one `Final`;
closing it cancels the request) and `metrics_text()` (Prometheus text, or None when metrics go elsewhere).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from dualbrain.errors import DualbrainError
from dualbrain.runtime.sampling import default_params
from dualbrain.runtime.serve import protocol as P
from dualbrain.runtime.serve.choices import ChatChoice, CompletionChoice, TokenText
from dualbrain.runtime.serve.output import ChatOutput, prompt_opens_thinking
from dualbrain.runtime.serve.service import Busy, Final

DISCONNECT_POLL_S = 0.2
# HTTP status -> the OpenAI error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 500: "server_error", 503: "server_overloaded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES[status], "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about the served export (read without loading its graphs)."""
    name: str
    tokenizer: Any                  # runtime.chat.Tokenizer, or None for an id-only export
    max_context: int
    vocab_size: int
    generation_config: dict | None
    logprobs: bool                  # the plain engine records them; the solver modes do not (yet)

    @classmethod
    def read(cls, model_dir: str, name: str | None = None, *, solver: bool = False) -> "ModelInfo":
        from dualbrain.errors import read_json_object
        from dualbrain.runtime.chat import Tokenizer
        from dualbrain.runtime.manifest import load_manifest

        d = Path(model_dir)
        manifest = load_manifest(d)
        gen = d / "generation_config.json"
        return cls(name or d.resolve().name, Tokenizer.from_dir(d) if manifest.tokenizer_files else None,
                   manifest.max_context, manifest.model.vocab_size,
                   read_json_object(gen) if gen.is_file() else None, logprobs=not solver)


@dataclass(frozen=True)
class ApiSettings:
    api_key: str | None = None
    max_body: int = 8 * 2**20


def build_app(backend, info: ModelInfo, settings: ApiSettings = ApiSettings(), lifespan=None) -> FastAPI:
    app = FastAPI(title="dualbrain", lifespan=lifespan)
    api = _Api(backend, info, settings)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.code, e.headers)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    # a dependency of the /v1/ routes rather than an HTTP middleware: Starlette's BaseHTTPMiddleware
    # re-streams every response chunk through a memory stream of its own
    async def authorized(request: Request):
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")

    v1 = {"dependencies": [Depends(authorized)]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = backend.metrics_text()
        if text is None:
            return error_response(404, "metrics are exported per replica through Ray's metrics export", "not_found")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", **v1)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=info.name, max_model_len=info.max_context)]).model_dump()

    @app.post("/v1/chat/completions", **v1)
    async def chat(request: Request):
        return await api.chat(request, await _read(request, P.ChatCompletionRequest, settings.max_body))

    @app.post("/v1/completions", **v1)
    async def completions(request: Request):
        return await api.completions(request, await _read(request, P.CompletionRequest, settings.max_body))

    return app


async def _read(request: Request, model, max_body: int):
    """The body as `model`: 413 over `max_body` (told or counted), 400 for bad JSON or bad fields."""
    told = request.headers.get("content-length")
    if told is not None and told.isdigit() and int(told) > max_body:
        raise ApiError(413, f"request body of {told} bytes is over the limit of {max_body}", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ApiError(413, f"request body is over the limit of {max_body} bytes", "body_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}", "invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", "invalid_parameter") from None


@dataclass
class _Job:
    """One choice to generate: its prompt, sampling and where it goes in the response."""
    index: int
    prompt_ids: list[int]
    params: Any
    choice: Any


class _Api:
    def __init__(self, backend, info: ModelInfo, settings: ApiSettings):
        self.backend, self.info, self.settings = backend, info, settings
        self.token_text = TokenText(info.tokenizer)

    # ---- the two endpoints --------------------------------------------------------------------------
    async def chat(self, request: Request, req: P.ChatCompletionRequest):
        self._check_model(req.model)
        tok = self._tokenizer("chat completions")
        tools = self._tools(req, tok)
        kwargs = dict(req.chat_template_kwargs or {})
        thinking = bool(kwargs.pop("enable_thinking", True))
        preserve = bool(kwargs.pop("preserve_thinking", False))
        if tools is not None:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            prompt = tok.render([_message(m, i) for i, m in enumerate(req.messages)], enable_thinking=thinking,
                                preserve_thinking=preserve, **kwargs)
        except DualbrainError as e:
            raise ApiError(400, str(e), "invalid_messages") from None
        ids = tok.encode(prompt)
        top = self._logprobs(req.logprobs, req.top_logprobs or 0)
        schemas = {t.function.name: t.function.parameters or {} for t in req.tools} if tools is not None else None
        jobs = [_Job(i, ids, self._params(req, ids, thinking, req.max_completion_tokens or req.max_tokens, i),
                     ChatChoice(i, ChatOutput(thinking=prompt_opens_thinking(prompt), tools=schemas), self.token_text,
                                logprobs=top is not None, token_ids=req.return_token_ids))
                for i in range(req.n)]
        rid = P.new_id("chatcmpl")
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return await self._sse(request, jobs, top, lambda choices, usage=None: P.ChatCompletionChunk(
                id=rid, model=self.info.name, choices=choices, usage=usage), usage, first=self._role_chunk)
        await self._run(request, jobs, top)
        return _json(P.ChatCompletion(id=rid, model=self.info.name, choices=[j.choice.result() for j in jobs],
                                      usage=_usage(jobs), prompt_token_ids=ids if req.return_token_ids else None))

    async def completions(self, request: Request, req: P.CompletionRequest):
        self._check_model(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported", "unsupported_parameter")
        top = self._logprobs(req.logprobs is not None, req.logprobs or 0)
        jobs = []
        for ids in self._prompts(req.prompt):
            for i in range(req.n):
                k = len(jobs)
                jobs.append(_Job(k, ids, self._params(req, ids, True, req.max_tokens, i),
                                 CompletionChoice(k, self.token_text, logprobs=top is not None,
                                                  token_ids=req.return_token_ids, prompt_ids=ids)))
        rid = P.new_id("cmpl")
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return await self._sse(request, jobs, top, lambda choices, usage=None: P.Completion(
                id=rid, model=self.info.name, choices=choices, usage=usage), usage)
        await self._run(request, jobs, top)
        return _json(P.Completion(id=rid, model=self.info.name, choices=[j.choice.result() for j in jobs],
                                  usage=_usage(jobs)))

    # ---- requests to parameters ---------------------------------------------------------------------
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.info.name:
            raise ApiError(404, f"the model {name!r} does not exist (this server serves {self.info.name!r})",
                           "model_not_found")

    def _tokenizer(self, what: str):
        if self.info.tokenizer is None:
            raise ApiError(400, f"this export has no tokenizer: {what} need one (send token ids to "
                                "/v1/completions)", "no_tokenizer")
        return self.info.tokenizer

    def _tools(self, req: P.ChatCompletionRequest, tok):
        """The tools to render and parse calls for (None: none); refuses what cannot be honoured."""
        if not req.tools or req.tool_choice == "none":
            return None
        if req.tool_choice not in (None, "auto"):
            raise ApiError(400, "tool_choice 'required' or a named function needs constrained decoding, which "
                                "this server does not do; use 'auto'", "unsupported_tool_choice")
        if "tools" not in (tok.chat_template or ""):
            raise ApiError(400, "this model's chat template does not render tools", "tools_unsupported")
        return req.tools

    def _logprobs(self, wanted: bool, top: int) -> int | None:
        if not wanted:
            return None
        if not self.info.logprobs:
            raise ApiError(400, "logprobs are not available with a solver mode", "unsupported_parameter")
        return top

    def _prompts(self, prompt) -> list[list[int]]:
        """A completion's prompt(s) as token ids: a string, ids, or a list of either."""
        many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        prompts = prompt if many else [prompt]
        out = []
        for p in prompts:
            ids = self._tokenizer("text prompts").encode(p) if isinstance(p, str) else list(p)
            bad = [i for i in ids if not 0 <= i < self.info.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1})",
                               "invalid_token_id")
            out.append(ids)
        return out

    def _params(self, req, ids: list[int], thinking: bool, max_tokens: int | None, i: int):
        ctx = self.info.max_context
        if not ids:
            raise ApiError(400, "the prompt is empty", "empty_prompt")
        if len(ids) >= ctx or (max_tokens is not None and len(ids) + max_tokens > ctx):
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; the request has "
                                f"{len(ids)} prompt tokens and asks for {max_tokens or 1} more",
                           "context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        top_k = None if req.top_k is None else max(req.top_k, 0)           # vLLM: -1 is off
        try:
            return default_params(self.info.generation_config, thinking).replace(
                temperature=req.temperature, top_p=req.top_p, top_k=top_k, presence_penalty=req.presence_penalty,
                seed=None if req.seed is None else req.seed + i, stop=stop or None,
                max_new_tokens=max_tokens or ctx - len(ids))
        except DualbrainError as e:
            raise ApiError(400, str(e), "invalid_parameter") from None

    # ---- running ------------------------------------------------------------------------------------
    async def _opened(self, request: Request, job: _Job, top) -> AsyncIterator:
        """The job's event stream with its first event already in (so a full queue or a refused request is
        an HTTP error, not a broken stream)."""
        events = self.backend.stream(job.prompt_ids, job.params, top)
        try:
            first = await _or_gone(request, events.__anext__())
        except Busy as e:
            await events.aclose()
            raise ApiError(503, f"server busy: {e}; retry later", "server_busy", {"Retry-After": "1"}) from None
        except DualbrainError as e:
            await events.aclose()
            raise ApiError(400, str(e), "invalid_request") from None
        except BaseException:
            await events.aclose()
            raise
        return _prepend(first, events)

    async def _open_all(self, request: Request, jobs: list[_Job], top) -> list:
        opened = await asyncio.gather(*(self._opened(request, j, top) for j in jobs), return_exceptions=True)
        failed = [e for e in opened if isinstance(e, BaseException)]
        if failed:
            for s in opened:
                if not isinstance(s, BaseException):
                    await s.aclose()
            raise failed[0]
        return opened

    async def _run(self, request: Request, jobs: list[_Job], top) -> None:
        streams = await self._open_all(request, jobs, top)

        async def collect(job, events):
            async for ev in events:
                job.choice.finish(ev) if isinstance(ev, Final) else job.choice.delta(ev)

        await _or_gone(request, asyncio.gather(*(collect(j, s) for j, s in zip(jobs, streams))))

    async def _sse(self, request: Request, jobs, top, chunk, include_usage: bool, first=None):
        streams = await self._open_all(request, jobs, top)

        async def events():
            try:
                if first is not None:
                    yield _sse(chunk(first(jobs)))
                async for job, ev in _merged(jobs, streams):
                    c = job.choice.finish(ev) if isinstance(ev, Final) else job.choice.delta(ev)
                    if c is not None:
                        yield _sse(chunk([c]))
                if include_usage:
                    yield _sse(chunk([], usage=_usage(jobs)))
                yield "data: [DONE]\n\n"
            finally:                      # the client went away (or we are done): cancel what still runs
                for s in streams:
                    await s.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _role_chunk(jobs) -> list:
        return [P.ChatChunkChoice(index=j.index, delta=P.ChatDelta(role="assistant", content="")) for j in jobs]


def _message(m: dict, i: int) -> dict:
    """An OpenAI message as the chat template takes it: text parts joined, a null content empty, tool-call
    arguments (a JSON string in the API) as the object the template iterates over."""
    m = dict(m)
    content = m.get("content")
    if content is None:
        m["content"] = ""
    elif isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(400, f"messages.{i}.content: only text parts are supported", "invalid_messages")
        m["content"] = "".join(p.get("text", "") for p in content)
    calls = []
    for call in m.get("tool_calls") or []:
        fn = dict(call.get("function") or {}) if isinstance(call, dict) else {}
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
        calls.append({**call, "function": fn} if isinstance(call, dict) else call)
    if calls:
        m["tool_calls"] = calls
    return m


def _usage(jobs: list[_Job]) -> P.Usage:
    prompts = {id(j.prompt_ids): len(j.prompt_ids) for j in jobs}      # n choices share one prompt
    done = sum(j.choice.completion_tokens for j in jobs)
    return P.Usage(prompt_tokens=sum(prompts.values()), completion_tokens=done,
                   total_tokens=sum(prompts.values()) + done)


def _json(model) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


def _sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def _prepend(first, events):
    yield first
    async for ev in events:
        yield ev


async def _merged(jobs, streams):
    """(job, event) from every stream as they come."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield jobs[0], ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job, events):
        try:
            async for ev in events:
                await queue.put((job, ev))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(j, s)) for j, s in zip(jobs, streams)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield item
        for t in tasks:
            t.result()                  # re-raise a stream's error
    finally:                            # (a client gone): stop the pumps before their streams are closed
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _or_gone(request: Request, aw):
    """Await `aw`, cancelling it when the client disconnects first (its streams close: requests cancel)."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
