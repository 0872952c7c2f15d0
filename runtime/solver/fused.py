"""Fused mode: the two models' layers interleaved, bridges carrying the small model's hidden states
into the large model's residual stream (CALM-style; runtime/bridges.py).

One fused call over new tokens: the small model runs its layers up to the deepest one a bridge reads
(on its own thread beside the large model's first layers when there are cores for both -- ONNX Runtime
releases the GIL -- else first); the large
model runs its layers in segments, and after each linked layer the bridge adds its cross-attention
over the small model's hidden states (keys/values cached per row like attention K/V, causal); then
the large model's head. Three states move together (`FusedStates`): the large model's, the small
model's (its first layers only) and the bridges'; they batch, mark and roll back like one.

`FusedDecode` is the engine mode: a fused request is one engine request.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.blocks import BRIDGE, KINDS, model_feeds
from dualbrain.runtime.bridges import BridgeConfig, check_belongs, load_config
from dualbrain.runtime.engine import Engine, PlainDecode, Request
from dualbrain.runtime.manifest import BlockInfo, Manifest, safe_child
from dualbrain.runtime.model import Model
from dualbrain.runtime.state import State


class Bridges:
    """An export of bridges (`dualbrain export BRIDGES -o OUT`), loaded on a backend."""

    def __init__(self, directory: Path, cfg: BridgeConfig, blocks: list[BlockInfo], backend, np_dtype):
        self.dir, self.cfg, self.blocks, self.backend, self.np_dtype = directory, cfg, blocks, backend, np_dtype

    @classmethod
    def load(cls, directory: str | os.PathLike, large: Model, backend: str = "onnxruntime") -> "Bridges":
        from dualbrain.runtime.backends import load_backend

        directory = Path(directory)
        cfg = load_config(directory)
        if cfg.dtype is None:
            raise DualbrainError(f"{directory} holds trained bridges, not their export: run "
                                 f"`dualbrain export {directory} -o OUT` and pass OUT")
        for rel, info in cfg.files.items():
            p = safe_child(directory, rel, "bridges.json")
            if not p.is_file() or p.stat().st_size != info.get("size"):
                raise DualbrainError(f"{directory}: {rel} is missing or has the wrong size")
        sig = KINDS[BRIDGE].signature(cfg.shape, cfg.dtype)
        blocks = [BlockInfo(name, BRIDGE, f"{name}.onnx", sig.inputs, sig.outputs, link.large_layer, sig.state)
                  for name, link in zip(cfg.block_names(), cfg.links)]
        man = Manifest(model=large.spec, dtype=cfg.dtype, opset=0, max_context=large.max_context, window=False,
                       blocks=tuple(blocks), files=cfg.files)
        return cls(directory, cfg, blocks, load_backend(backend, directory, man), large.np_dtype)

    def new_state(self, batch: int, capacity: int, max_capacity: int) -> State:
        return State(self.blocks, batch, capacity, max_capacity, self.np_dtype)


@dataclass
class FusedStates:
    """The large model's, the small model's and the bridges' states, moved as one."""
    large: State
    small: State
    bridges: State

    @property
    def parts(self) -> tuple[State, State, State]:
        return self.large, self.small, self.bridges

    def mark(self) -> None:
        for s in self.parts:
            s.mark()

    def unmark(self) -> None:
        for s in self.parts:
            s.unmark()

    def rollback(self, row: int, n: int) -> None:
        for s in self.parts:
            s.rollback(row, n)

    def evict(self, row: int) -> None:
        for s in self.parts:
            s.evict(row)

    def insert(self, row: int, src: "FusedStates", src_row: int = 0) -> None:
        for s, o in zip(self.parts, src.parts):
            s.insert(row, o, src_row)


class FusedPair:
    """The pair with its bridges: `step(ids, states)` is one fused call (logits of the last positions)."""

    # With fewer cores the two models' ONNX Runtime thread pools fight over them: measured on 2 cores, the
    # small model on its own thread made a fused step slower than running it first (tests/benchmarks).
    PARALLEL_MIN_CORES = 4

    def __init__(self, large: Model, small: Model, bridges: Bridges, *, parallel: bool | None = None):
        if small.vocab_size != large.vocab_size:
            raise DualbrainError("the models do not share a vocabulary")
        cfg = bridges.cfg
        check_belongs(cfg, large.manifest.source.get("identity"), small.manifest.source.get("identity"),
                      where=f"the bridges in {bridges.dir}")
        if cfg.shape.hidden_size != large.spec.hidden_size or cfg.shape.small_hidden_size != small.spec.hidden_size:
            raise DualbrainError(f"the bridges in {bridges.dir} do not fit these models' widths")
        self.large, self.small, self.bridges = large, small, bridges
        self.links = cfg.links
        self.small_layers = max(x.small_layer for x in self.links) + 1   # the small model runs only these
        if parallel is None:
            parallel = (os.cpu_count() or 1) >= self.PARALLEL_MIN_CORES
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dualbrain-small") if parallel else None

    @property
    def max_context(self) -> int:
        return min(self.large.max_context, self.small.max_context)

    def new_state(self, batch: int, capacity: int) -> FusedStates:
        return FusedStates(self.large.new_state(batch, min(self.max_context, capacity)),
                           *self.side_states(batch, capacity))

    def new_small_state(self, batch: int, capacity: int) -> State:
        return State(self.small.layers[:self.small_layers], batch, capacity, self.small.max_context,
                     self.small.np_dtype)

    def side_states(self, batch: int, capacity: int) -> tuple[State, State]:
        cap = min(self.max_context, capacity)
        return self.new_small_state(batch, cap), self.bridges.new_state(batch, cap, self.max_context)

    def _small_hidden(self, ids, state: State, step) -> dict[int, np.ndarray]:
        wanted = {x.small_layer for x in self.links}
        _, after = self.small.run_layers(self.small.embed_ids(ids), state, step, 0, self.small_layers,
                                         hidden_after=wanted)
        return after

    def step(self, ids: np.ndarray, states: FusedStates, *, pad: np.ndarray | None = None,
             logits_to_keep: int = 1) -> np.ndarray:
        """Feed `ids` (B, T) through the pair; logits (B, N, V) of the last N = `logits_to_keep` positions."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, t = ids.shape
        if states.large.length + t > self.max_context:
            raise DualbrainError(f"sequence of {states.large.length + t} tokens exceeds the pair's maximum "
                                 f"context of {self.max_context}")
        new_mask = np.ones((b, t), np.int64) if pad is None else np.asarray(pad, np.int64)
        steps = [s.begin(new_mask) for s in states.parts]
        large_step, small_step, bridge_step = steps
        small = (self._pool.submit(self._small_hidden, ids, states.small, small_step) if self._pool
                 else None)
        small_hidden = None if small else self._small_hidden(ids, states.small, small_step)
        h = self.large.embed_ids(ids)
        start = 0
        for i, (link, block) in enumerate(zip(self.links, self.bridges.blocks)):
            h, _ = self.large.run_layers(h, states.large, large_step, start, link.large_layer + 1)
            if small_hidden is None:
                small_hidden = small.result()
            feeds = model_feeds(block.inputs, attention_mask=bridge_step.mask)
            feeds.update(hidden=h, small_hidden=small_hidden[link.small_layer], **states.bridges.feeds(i))
            out = self.bridges.backend.run(block, feeds)
            bridge_step.outputs[i] = out
            h = out[KINDS[BRIDGE].gives]
            start = link.large_layer + 1
        h, _ = self.large.run_layers(h, states.large, large_step, start)
        logits = self.large.head_logits(np.ascontiguousarray(h[:, t - logits_to_keep:]))
        for s, st in zip(states.parts, steps):
            s.commit(st)
        return logits


class FusedDecode(PlainDecode):
    """The engine mode: every call -- prefill chunks and decode steps -- is a fused call."""

    def __init__(self, pair: FusedPair):
        self.pair = pair

    def attach(self, engine: Engine) -> None:
        if engine.model is not self.pair.large:
            raise DualbrainError("a fused engine runs over the pair's large model")
        self.small, self.bridges = self.pair.side_states(engine.max_batch, engine.capacity)

    def admit(self, engine: Engine, req: Request) -> None:
        req.solver = self.pair.side_states(1, req.need)

    def _states(self, engine: Engine, req: Request | None = None) -> FusedStates:
        if req is not None:
            return FusedStates(req.state, *req.solver)
        return FusedStates(engine.state, self.small, self.bridges)

    def prefill(self, engine: Engine, req: Request, chunk: list[int]) -> np.ndarray:
        return self.pair.step(np.asarray([chunk], np.int64), self._states(engine, req))[:, -1]

    def insert(self, engine: Engine, row: int, req: Request) -> None:
        self.small.insert(row, req.solver[0])
        self.bridges.insert(row, req.solver[1])
        req.solver = None

    def evict(self, engine: Engine, row: int) -> None:
        self.small.evict(row)
        self.bridges.evict(row)

    def next_logits(self, engine: Engine, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.pair.step(tokens, self._states(engine), pad=mask)[:, -1]
