"""The engine behind the API: one export (or a pair running a solver mode) on a started step engine, whose
requests stream back as `Delta`s and one `Final`, from asyncio code.

The same object serves the single-process server and each Ray Serve replica (runtime/serve/ray_app.py),
so both stream exactly the same events. Stop strings are cut here, not by the caller: text that could be
the start of a stop string is held back until the next token decides (the engine matches stop strings
on the text it has streamed, so a delta may end inside one).

A stream takes its request's tokens by polling (`Request.drain`, every `POLL_S` while it has a row): a
thread blocked on each request's queue would be woken by every token, and each wake-up takes the GIL from
the engine thread between two steps (measured: 8 streams then slowed the steps ~3x). Polling also sends
whatever tokens are ready in one chunk.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from dualbrain.runtime.sampling import SamplingParams, TokenLogprobs

POLL_S = 0.002           # a running request's tokens reach its stream this often
WAIT_POLL_S = 0.01       # a request still waiting for a row checks this often


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class Final:
    finish_reason: str           # eos | stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


class Busy(Exception):
    """The queue of requests waiting for a row is full (the server answers 503 with Retry-After)."""


@dataclass(frozen=True)
class ServeConfig:
    """What `dualbrain serve` loads and how much it takes on; picklable (Ray replicas get a copy)."""
    model_dir: str
    small_dir: str | None = None
    mode: str | None = None             # a solver mode (runtime/solver.MODES); None: the plain engine
    bridges_dir: str | None = None      # the fused mode's bridges export
    max_batch: int = 8
    max_queue: int = 64                 # requests waiting for a row before new ones get 503
    ort_threads: int | None = None      # ONNX Runtime intra-op threads per model (None: its default)


class EngineService:
    def __init__(self, config: ServeConfig, metrics=None):
        from dualbrain.runtime.engine import Engine
        from dualbrain.runtime.model import Model

        self.config = config
        options = {"threads": config.ort_threads} if config.ort_threads else {}
        large = Model.load(config.model_dir, **options)
        self.engine = Engine(large, max_batch=config.max_batch, mode=_mode(config, large, options))
        self.metrics = metrics
        self.engine.start()
        if metrics is not None:
            metrics.watch(self.engine)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.engine.rows)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting) + (self.engine.prefilling is not None)

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     logprobs: int | None = None) -> AsyncIterator[Delta | Final]:
        """Submit and stream one request; closing the iterator early (a client gone) cancels it."""
        if len(self.engine.waiting) >= self.config.max_queue:
            raise Busy(f"{len(self.engine.waiting)} requests are waiting for a row")
        t0 = time.perf_counter()
        req = self.engine.submit(prompt_ids, params, logprobs=logprobs)
        gen, cut, sent = req.generation, _StopCut(params.stop), 0
        try:
            while True:
                finished = req.done                   # then every event is in its queue already
                batch = req.drain()
                ids = gen.new_ids[sent:sent + len(batch)]    # a last held-back text repeats no token
                text = cut.feed("".join(d for _, d in batch))
                lps = gen.logprobs[sent:sent + len(ids)] if gen.logprobs is not None else None
                sent += len(ids)
                if ids or text:
                    yield Delta(ids, text, lps)
                if finished:
                    break
                await asyncio.sleep(POLL_S if req.row is not None else WAIT_POLL_S)
            tail = cut.finish()
            if tail:
                yield Delta([], tail)
            if self.metrics is not None:
                self.metrics.finished(req, t0)
            yield Final(gen.finish_reason, len(gen.prompt_ids), len(gen.new_ids))
        finally:
            if not req.done:
                req.cancel()
                if self.metrics is not None:
                    self.metrics.cancelled()

    def metrics_text(self) -> bytes | None:
        return self.metrics.text() if self.metrics is not None else None

    def close(self) -> None:
        self.engine.stop()


def _mode(config: ServeConfig, large, options):
    if config.mode is None:
        return None
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.solver import SolverOptions, build_mode

    small = Model.load(config.small_dir, **options) if config.small_dir else None
    extra = {"bridges": config.bridges_dir} if config.bridges_dir else {}
    return build_mode(config.mode, large, small, SolverOptions(**extra))   # checks the mode's needs


class _StopCut:
    """Holds back the streamed text that could still become a stop string, and ends the text where the first
    stop string begins (a token's text may run on past it). Cut on the streamed text itself: a full decode of
    the tokens can place undecodable bytes differently."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        return self._upto(len(self.text) - self.hold)

    def finish(self) -> str:
        return self._upto(len(self.text))

    def _upto(self, end: int) -> str:
        start = max(0, self.sent - self.hold)
        hits = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
        end = max(self.sent, min(hits + [end]))
        out, self.sent = self.text[self.sent:end], end
        return out


def check_dirs(config: ServeConfig) -> None:
    """Refuse a missing export or a mismatched pair before anything loads (DualbrainError)."""
    from dualbrain.errors import DualbrainError
    from dualbrain.runtime.solver import MODES
    from dualbrain.runtime.solver.pair import check_pair

    for d in (config.model_dir, config.small_dir):
        if d is not None and not (Path(d) / "manifest.json").is_file():
            raise DualbrainError(f"{d} is not an export (no manifest.json)")
    if config.mode is not None and config.mode not in MODES:
        raise DualbrainError(f"unknown solver mode {config.mode!r} (choose from {', '.join(MODES)})")
    if config.mode is None and (config.small_dir or config.bridges_dir):
        raise DualbrainError("--small and --bridges need --mode (how the pair runs)")
    if config.small_dir is not None:
        check_pair(config.model_dir, config.small_dir)
    if config.max_batch < 1 or config.max_queue < 1:
        raise DualbrainError("--max-batch and --max-queue must be at least 1")
