"""A loaded export: manifest + backend sessions + tokenizer. Loaded once, serves many generations.

`Model.forward(ids, state)` runs embed -> layers -> head over new tokens, updating the rows' own
`State` (KV for attention layers, conv + recurrent state for GDN layers); `Model.step` does the same
and also returns the final hidden states. A mode that needs more (hidden states between layers,
another model's layers in between) composes `state.begin` -> `embed_ids` -> `run_layers` (any range,
any number of times) -> `head_logits` -> `state.commit`. Nothing here imports torch or transformers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dualbrain.errors import DualbrainError, read_json_object
from dualbrain.runtime.backends import Backend, load_backend
from dualbrain.runtime.blocks import KINDS, LAST_HIDDEN, LOGITS_TO_KEEP, MODEL_INPUTS, model_feeds
from dualbrain.runtime.dtypes import numpy_dtype
from dualbrain.runtime.manifest import Manifest, load_manifest, state_name
from dualbrain.runtime.spec import ModelSpec
from dualbrain.runtime.state import State, Step


class Model:
    def __init__(self, model_dir: Path, manifest: Manifest, backend: Backend):
        self.dir = model_dir
        self.manifest = manifest
        self.backend = backend
        self.spec: ModelSpec = manifest.model
        self.vocab_size = self.spec.vocab_size
        self.max_context = manifest.max_context
        self.dtype = backend.compute_dtype(manifest.dtype)
        self.embed = manifest.block("embed")
        self.head = manifest.block("head")
        self.layers = manifest.layers
        # the linked graph's (graph name, state name) pairs per layer, built once rather than per token
        self._linked_in = [[(state_name(b.name, s.input), s.input) for s in b.state] for b in self.layers]
        self._linked_out = [[(state_name(b.name, s.output), s.output) for s in b.state] for b in self.layers]
        self._linked_window_out = [
            pairs + [(state_name(b.name, s.window_output), s.window_output) for s in b.state if s.window_output]
            for pairs, b in zip(self._linked_out, self.layers)]
        # the model-level inputs the linked graph takes (each once), and what it is asked to return
        self._linked_inputs = list({t.name: t for b in manifest.chain for t in b.inputs
                                    if t.name in MODEL_INPUTS}.values())
        self._output = KINDS[self.head.kind].gives
        self._linked_fetch = {window: [self._output, LAST_HIDDEN] + [full for layer in outs for full, _ in layer]
                              for window, outs in ((False, self._linked_out), (True, self._linked_window_out))}
        self._tokenizer = None
        gen = model_dir / "generation_config.json"
        self.generation_config = read_json_object(gen) if gen.is_file() else None

    @classmethod
    def load(cls, model_dir: str | os.PathLike, backend: str = "onnxruntime", *, verify_hashes: bool = False,
             **options) -> "Model":
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir, verify_hashes=verify_hashes)
        return cls(model_dir, manifest, load_backend(backend, model_dir, manifest, **options))

    # ---- tokenizer / chat -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from dualbrain.runtime.chat import Tokenizer

            self._tokenizer = Tokenizer.from_dir(self.dir)
        return self._tokenizer

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = list(self.spec.eos_token_ids)
        if not ids and self.manifest.tokenizer_files:
            ids = list(self.tokenizer.eos_ids)
        return tuple(ids)

    # ---- state -------------------------------------------------------------------------------------------
    def new_state(self, batch: int, capacity: int | None = None) -> State:
        """Empty state for `batch` rows. `capacity`: positions to preallocate the KV cache for (a
        generation knows prompt + new tokens); it grows by doubling up to the export's max_context."""
        cap = capacity if capacity is not None else min(self.max_context, 1024)
        return State(self.layers, batch, max(1, cap), self.max_context, self.np_dtype)

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes of K/V one row keeps per position, over every appended state of every layer."""
        return sum(int(np.prod([d for d in s.shape if isinstance(d, int)])) * self.np_dtype(s.dtype).itemsize
                   for b in self.layers for s in b.state if s.append)

    def np_dtype(self, dtype: str):
        """The numpy dtype this backend feeds/returns for a manifest dtype (bf16 exports compute in
        fp32 on ONNX Runtime's CPU build, in bf16 on TensorRT)."""
        if dtype == "bfloat16" and self.dtype == "float32":
            return np.dtype(np.float32)
        return numpy_dtype(dtype)

    def check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not (0 <= int(i) < self.vocab_size)]
        if bad:
            raise DualbrainError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, state: State, *, pad: np.ndarray | None = None,
                all_logits: bool = False, logits_to_keep: int = 1) -> np.ndarray:
        """Feed `ids` (B, T) through the model, updating `state`; returns logits (B, V) of the last
        position, (B, N, V) of the last N with `logits_to_keep=N > 1`, or (B, T, V) with `all_logits`.
        `pad` (B, T) marks padding with 0 (left: a prefill from an empty state; right: ragged calls)."""
        t = np.shape(ids)[1]
        res = self.step(ids, state, pad=pad, logits_to_keep=t if all_logits else logits_to_keep)
        return res.logits if all_logits or logits_to_keep > 1 else res.logits[:, -1]

    def step(self, ids: np.ndarray, state: State, *, pad: np.ndarray | None = None, logits_to_keep: int = 1,
             hidden_after: Sequence[int] = (), linked: bool | None = None) -> StepResult:
        """One whole-stack call: embed -> every layer -> head on the last `logits_to_keep` positions.

        The linked whole-model graph serves it when the backend has one (`linked`, default: yes), unless
        hidden states after chosen layers are asked for (`hidden_after`: layer indices)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, t = ids.shape
        if state.length + t > self.max_context:
            raise DualbrainError(
                f"sequence of {state.length + t} tokens exceeds the export's maximum context of {self.max_context}"
            )
        if not 1 <= logits_to_keep <= t:
            raise DualbrainError(f"logits_to_keep must be in 1..{t} for a call of {t} positions, got {logits_to_keep}")
        new_mask = np.ones((b, t), np.int64) if pad is None else np.asarray(pad, np.int64)
        step = state.begin(new_mask)
        use_linked = (self.backend.has_linked if linked is None else linked) and not hidden_after \
            and (not step.window or self.manifest.linked_window is not None)
        if use_linked:
            logits, last_hidden = self._step_linked(ids, step, state, logits_to_keep)
            after = {}
        else:
            hidden, after = self.run_layers(self.embed_ids(ids), state, step, hidden_after=hidden_after)
            last_hidden = np.ascontiguousarray(hidden[:, t - logits_to_keep:])
            logits = self.head_logits(last_hidden)
        state.commit(step)
        return StepResult(logits, last_hidden, after)

    def step_rows(self, rows: Mapping[int, Sequence[int]], state: State, *,
                  last: Mapping[int, int] | None = None) -> dict[int, StepResult]:
        """Feed each row its own tokens in one call, right-padded (rows not named feed nothing and keep
        their state); returns per row the logits (N, V) and hidden states (N, H) of its last N real
        positions, N = `last[row]` (default 1). A speculative verify call; a drafter's ragged catch-up."""
        rows = {r: list(t) for r, t in rows.items() if len(t)}
        if not rows:
            raise DualbrainError("step_rows needs at least one row with tokens")
        width = max(len(t) for t in rows.values())
        ids = np.zeros((state.batch, width), np.int64)
        pad = np.zeros((state.batch, width), np.int64)
        for r, toks in rows.items():
            ids[r, :len(toks)], pad[r, :len(toks)] = toks, 1
        want = {r: (last or {}).get(r, 1) for r in rows}
        if any(not 1 <= n <= len(rows[r]) for r, n in want.items()):
            raise DualbrainError("step_rows: each row's `last` must be within its own tokens")
        keep = width - min(len(rows[r]) - want[r] for r in rows)
        res = self.step(ids, state, pad=None if pad.all() else pad, logits_to_keep=keep)
        off = width - keep
        return {r: StepResult(res.logits[r, len(t) - want[r] - off:len(t) - off],
                              res.hidden[r, len(t) - want[r] - off:len(t) - off]) for r, t in rows.items()}

    # ---- layer-granular steps: a mode composes these between state.begin and state.commit ------------
    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (B, T) -> hidden states (B, T, H)."""
        kind = KINDS[self.embed.kind]
        feeds = model_feeds(self.embed.inputs, input_ids=np.ascontiguousarray(ids, dtype=np.int64))
        return self.backend.run(self.embed, feeds)[kind.gives]

    def run_layers(self, hidden: np.ndarray, state: State, step: Step, start: int = 0, stop: int | None = None,
                   *, hidden_after: Sequence[int] = ()) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Layers start..stop-1 on `hidden` within `step` (their state outputs go to `step.outputs`);
        returns the hidden states after the last of them and after each layer in `hidden_after`."""
        after = {}
        for i in range(start, len(self.layers) if stop is None else stop):
            block = self.layers[i]
            kind = KINDS[block.kind]
            feeds = model_feeds(block.inputs, attention_mask=step.mask, position_ids=step.positions)
            feeds[kind.takes] = hidden
            feeds.update(state.feeds(i))
            out = self.backend.run(block, feeds, window=step.window and block.window_file is not None)
            step.outputs[i] = out
            hidden = out[kind.gives]
            if i in hidden_after:
                after[i] = hidden
        return hidden, after

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Hidden states (B, N, H) entering the head -> logits (B, N, V) in float32."""
        kind = KINDS[self.head.kind]
        return self.backend.run(self.head, {kind.takes: np.ascontiguousarray(hidden)})[kind.gives]

    def _step_linked(self, ids, step: Step, state: State, keep: int):
        """One call of the whole-model graph (the window one when the step needs per-position states)."""
        feeds = model_feeds(self._linked_inputs, input_ids=ids, attention_mask=step.mask,
                            position_ids=step.positions)
        feeds[LOGITS_TO_KEEP.name] = np.array([keep], np.int64)
        for i, ins in enumerate(self._linked_in):
            st = state.feeds(i)
            feeds.update((full, st[name]) for full, name in ins)
        outs = self._linked_window_out if step.window else self._linked_out
        out = self.backend.run_linked(feeds, self._linked_fetch[step.window], window=step.window)
        for i, layer in enumerate(outs):
            step.outputs[i] = {name: out[full] for full, name in layer}
        return out[self._output], out[LAST_HIDDEN]


@dataclass
class StepResult:
    logits: np.ndarray                  # (B, N, V) float32: the last N positions
    hidden: np.ndarray                  # (B, N, H): the hidden states entering the head at those positions
    hidden_after: dict[int, np.ndarray] = field(default_factory=dict)   # layer -> its output (B, T, H)
