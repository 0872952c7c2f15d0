"""The step engine: continuous batching of independent requests over one model.

    engine = Engine(model, max_batch=8)
    req = engine.submit(prompt_ids, SamplingParams(seed=1))     # from any thread
    for token_id, delta in req: ...                             # streams; drives the engine if no thread
    gen = req.result()                                          # the Generation

`step()` is deterministic: it admits waiting requests into free rows, prefills one chunk of the request
being prefilled (on its own one-row state, so a long prompt never stalls the running rows for more
than a chunk), and advances every running row by one token in one batched call. A prefilled request's
state moves into a free row (`State.insert`); a finished or cancelled one leaves its row
(`State.evict`); the other rows are untouched (runtime/state.py keeps per-row lengths). Each request
has its own sampling parameters, random stream, presence mask (only tokens it kept count), stop
strings, token limit and detokenizer. `start()` runs the steps on a background thread instead (for
servers); `async for` over a request works from asyncio code.

What a step does for the running rows is the engine's mode: `PlainDecode` (one token per row) by
default, or a solver mode (runtime/solver: speculative, mtp, cascade) that brings a drafter along,
prefilled beside each request and moved in and out of rows with it.

Admission: requests wait for a free row (one prefill at a time). The batch's KV cache is `max_batch`
rows as long as the longest running request's prompt + new tokens; with `kv_bytes`, a request that
would make it larger than that is refused at `submit`, saying how much it needs.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.model import Model
from dualbrain.runtime.sampling import Sampler, SamplingParams, TokenLogprobs, token_logprobs

_DONE = object()


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None    # eos | stop | length | cancelled
    # solver modes (runtime/solver): drafts proposed and kept, rounds run, escalations to the large model
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    escalations: int = 0
    # per new token, when submitted with `logprobs=k` (filled where the engine samples: the plain mode)
    logprobs: list[TokenLogprobs] | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Request:
    """A submitted request: iterate it for `(token_id, text_delta)`, `result()` for the Generation."""

    def __init__(self, engine: "Engine", rid: int, prompt: list[int], params: SamplingParams,
                 logprobs: int | None = None):
        self.engine = engine
        self.id = rid
        self.params = params
        self.logprobs = logprobs             # record each sampled token's logprob and this many top ones
        self.generation = Generation(list(prompt), logprobs=[] if logprobs is not None else None)
        self.sampler = Sampler(params, 1)
        tok = engine.model.tokenizer if engine.model.manifest.tokenizer_files else None
        self.decoder = tok.stream_decoder() if tok is not None else None
        self.text = ""                       # streamed so far (stop strings are matched on it)
        self.state = None                    # one-row prefill state until it moves into a row
        self.solver = None                   # the mode's own per-request record (runtime/solver), if any
        self.fed = 0                         # prompt tokens prefilled so far
        self.row: int | None = None
        self.next_token: int | None = None   # sampled, not yet fed
        self.need = len(prompt) + params.max_new_tokens
        self._stop_span = max((len(s) for s in params.stop), default=0)   # a new match ends in the last delta
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancel = False
        self.t_start = self.t_first = self.t_done = None     # prefill began, first token, finished

    # ---- the caller's side ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, str]]:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                if self.engine.running:
                    ev = self._events.get()
                else:
                    self.engine.step()
                    continue
            if ev is _DONE:
                return
            yield ev

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.running and self._events.empty():
                await loop.run_in_executor(None, self.engine.step)
                continue
            ev = await loop.run_in_executor(None, self._events.get)
            if ev is _DONE:
                return
            yield ev

    def drain(self) -> list[tuple[int, str]]:
        """The `(token_id, text_delta)` events so far that nobody has taken, without waiting."""
        out = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return out
            if ev is _DONE:
                self._events.put(_DONE)        # still there for an iterator
                return out
            out.append(ev)

    def result(self, timeout: float | None = None) -> Generation:
        while not self._done.is_set():
            if self.engine.running:
                if not self._done.wait(timeout):
                    raise TimeoutError(f"request {self.id} still running")
            else:
                self.engine.step()
        return self.generation

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step."""
        self._cancel = True
        self.engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def prefill_tokens_per_s(self) -> float:
        t = (self.t_first or 0) - (self.t_start or 0)
        return len(self.generation.prompt_ids) / t if self.t_first and t > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, over the time after the first."""
        n = len(self.generation.new_ids) - 1
        t = (self.t_done or 0) - (self.t_first or 0)
        return n / t if n > 0 and self.t_done and t > 0 else 0.0

    # ---- the engine's side ----------------------------------------------------------------------------
    def _emit(self, token: int) -> None:
        g = self.generation
        if self.t_first is None:
            self.t_first = time.perf_counter()
        g.new_ids.append(token)
        delta = self.decoder.push(token) if self.decoder else ""
        self.text += delta
        self._events.put((token, delta))
        p, eng = self.params, self.engine
        if token in eng.eos:
            g.finish_reason = "eos"
        elif delta and p.stop and any(s in self.text[-(len(delta) + self._stop_span):] for s in p.stop):
            g.finish_reason = "stop"
        elif len(g.new_ids) >= p.max_new_tokens or len(g.prompt_ids) + len(g.new_ids) >= eng.model.max_context:
            g.finish_reason = "length"

    def _finish(self, reason: str | None = None) -> None:
        g = self.generation
        g.finish_reason = g.finish_reason or reason
        tail = self.decoder.flush() if self.decoder else ""
        if tail:
            self._events.put((g.new_ids[-1] if g.new_ids else -1, tail))
        if self.decoder:
            g.text = self.engine.model.tokenizer.decode(g.new_ids, skip_special_tokens=True)
            if g.finish_reason == "stop":
                cut = min((g.text.find(s) for s in self.params.stop if s in g.text), default=-1)
                g.text = g.text[:cut] if cut >= 0 else g.text
        self.t_done = time.perf_counter()
        self._events.put(_DONE)
        self._done.set()


class PlainDecode:
    """The plain mode: every running row advances by one token, all in one batched call.

    A mode is what the engine does for its requests between admission and release; the solver modes
    (runtime/solver) subclass this and bring a second model or the MTP head along: they prefill it
    beside the request's own prefill (`prefill`), move its rows in and out with the engine's
    (`insert`, `evict`), and draft and verify in `decode`."""

    def attach(self, engine: "Engine") -> None:
        """Called once by the engine it serves (allocate per-row state here)."""

    def admit(self, engine: "Engine", req: Request) -> None:
        """`req` starts its prefill (on `req.state`, a one-row state)."""

    def prefill(self, engine: "Engine", req: Request, chunk: list[int]) -> np.ndarray | None:
        """Feed one prompt chunk on `req.state`; returns the last position's logits (1, V) (after the
        last chunk the first token is sampled from them; None: the mode's `decode` chooses it)."""
        return engine.model.forward(np.asarray([chunk], np.int64), req.state)

    def insert(self, engine: "Engine", row: int, req: Request) -> None:
        """`req`'s prefill is done and its state moved into `row`."""

    def evict(self, engine: "Engine", row: int) -> None:
        """`row` was freed."""

    def decode(self, engine: "Engine", live: list[tuple[int, Request]]) -> None:
        tokens = np.zeros((engine.max_batch, 1), np.int64)
        mask = np.zeros((engine.max_batch, 1), np.int64)
        for row, req in live:
            tokens[row, 0], mask[row, 0] = req.next_token, 1
        logits = self.next_logits(engine, tokens, mask)
        for row, req in live:
            engine.sample(req, logits[row:row + 1])

    def next_logits(self, engine: "Engine", tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One token per row (`mask` 0: an empty row) through the model; logits (B, V)."""
        return engine.model.forward(tokens, engine.state, pad=mask)


class Engine:
    def __init__(self, model: Model, max_batch: int = 8, *, prefill_chunk: int = 512, kv_bytes: int | None = None,
                 capacity: int = 256, mode: PlainDecode | None = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise DualbrainError("max_batch and prefill_chunk must be positive")
        limits = model.backend
        if limits.max_batch and max_batch > limits.max_batch:
            raise DualbrainError(f"max_batch {max_batch} is more rows than the engines were built for "
                                 f"({limits.max_batch}): rebuild with a larger profile or lower it")
        self.model = model
        self.max_batch = max_batch
        # prompts prefill in chunks the backend takes in one call (TensorRT engines: their profile's maximum)
        self.prefill_chunk = min(prefill_chunk, limits.max_new_positions or prefill_chunk)
        self.kv_bytes = kv_bytes
        self.mode = mode or PlainDecode()
        self.eos = set(model.eos_ids)
        # positions preallocated per row (grows by doubling); a caller that knows its requests says so
        self.capacity = min(model.max_context, max(1, capacity))
        self.state = model.new_state(max_batch, capacity=self.capacity)
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.kv_bytes_per_position = model.kv_bytes_per_position
        self.mode.attach(self)

    # ---- submitting -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               logprobs: int | None = None) -> Request:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise DualbrainError("every prompt needs at least one token")
        self.model.check_ids(prompt)
        if len(prompt) > self.model.max_context:
            raise DualbrainError(f"prompt of {len(prompt)} tokens is longer than the export's maximum context "
                                 f"of {self.model.max_context}")
        req = Request(self, next(self._ids), prompt, params or SamplingParams(), logprobs)
        if self.kv_bytes is not None and self._kv_need(req.need) > self.kv_bytes:
            raise DualbrainError(f"request needs {self._kv_need(req.need) / 2**20:.1f} MiB of KV cache "
                                 f"({req.need} positions x {self.max_batch} rows), the engine has "
                                 f"{self.kv_bytes / 2**20:.1f} MiB")
        with self._lock:
            self.waiting.append(req)
            self._wakeup.notify()
        return req

    def _kv_need(self, positions: int) -> int:
        return min(positions, self.model.max_context) * self.max_batch * self.kv_bytes_per_position

    @property
    def idle(self) -> bool:
        return not self.waiting and self.prefilling is None and all(r is None for r in self.rows)

    # ---- one step -------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Decode every running row by one token, then admit and prefill one chunk (a request whose
        prefill ends here gets its first token now and joins the decode from the next step on).
        Returns whether it did any work."""
        with self._step_lock:
            self._drop_cancelled()
            worked = self._decode()
            self._admit()
            return self._prefill_chunk() or worked

    def _drop_cancelled(self) -> None:
        with self._lock:
            for req in [r for r in self.waiting if r._cancel]:
                self.waiting.remove(req)
                req._finish("cancelled")
        if self.prefilling is not None and self.prefilling._cancel:
            self.prefilling._finish("cancelled")
            self.prefilling = None
        for row, req in enumerate(self.rows):
            if req is not None and req._cancel:
                self._release(row, "cancelled")

    def _admit(self) -> None:
        if self.prefilling is not None or None not in self.rows:
            return
        with self._lock:
            if not self.waiting:
                return
            req = self.waiting.popleft()       # fits: submit refused any that could not
        req.state = self.model.new_state(1, capacity=min(self.model.max_context, req.need))
        req.t_start = time.perf_counter()
        self.mode.admit(self, req)
        self.prefilling = req

    def _prefill_chunk(self) -> bool:
        req = self.prefilling
        if req is None:
            return False
        prompt = req.generation.prompt_ids
        chunk = prompt[req.fed:req.fed + self.prefill_chunk]
        logits = self.mode.prefill(self, req, chunk)
        req.fed += len(chunk)
        if req.fed < len(prompt):
            return True
        row = self.rows.index(None)
        self.state.insert(row, req.state)
        self.mode.insert(self, row, req)
        req.state, req.row, self.rows[row], self.prefilling = None, row, req, None
        if logits is not None:         # a mode may choose the first token itself (cascade: in its first window)
            self.sample(req, logits)
        return True

    def _decode(self) -> bool:
        live = [(row, req) for row, req in enumerate(self.rows) if req is not None]
        if not live:
            return False
        self.mode.decode(self, live)
        return True

    def sample(self, req: Request, logits: np.ndarray) -> None:
        """Choose `req`'s next token from `logits` (1, V) with its own sampler; emit it, finish if done."""
        token = int(req.sampler(logits)[0])
        if req.logprobs is not None:
            req.generation.logprobs.append(token_logprobs(logits[0], token, req.logprobs))
        self.emit(req, [token], observed=True)

    def emit(self, req: Request, tokens: Sequence[int], *, observed: bool = False) -> int:
        """Emit `tokens` in order until `req` finishes (then it leaves its row); returns how many were
        emitted. The tokens count for the presence penalty unless the sampler saw them (`observed`)."""
        n = 0
        for token in tokens:
            if not observed:
                req.sampler.observe(np.asarray([token]), self.model.vocab_size)
            req._emit(int(token))
            n += 1
            if req.generation.finish_reason:
                if req.row is not None:
                    self._release(req.row)
                else:
                    req._finish()
                return n
        req.next_token = int(tokens[-1]) if n else req.next_token
        return n

    def _release(self, row: int, reason: str | None = None) -> None:
        req = self.rows[row]
        self.rows[row] = None
        self.state.evict(row)
        self.mode.evict(self, row)
        req._finish(reason)

    # ---- running on a thread --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run steps on a background thread until `stop()` (steps whenever there is work)."""
        if not self.running:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="dualbrain-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
        self._thread = None

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self.idle:
                    self._wakeup.wait()
                if self._stop:
                    return
            self.step()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
