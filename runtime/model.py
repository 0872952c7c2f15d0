"""A loaded export: manifest + backend sessions + tokenizer. Loaded once, serves many generations.

`Model.forward(ids, state)` runs embed -> layers -> head over new tokens, updating the
generation's own `State` (KV for attention layers, conv + recurrent state for GDN layers).
Nothing here imports torch or transformers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dualbrain.errors import DualbrainError, read_json_object
from dualbrain.runtime.backends import Backend, load_backend
from dualbrain.runtime.blocks import KINDS, model_feeds
from dualbrain.runtime.dtypes import numpy_dtype
from dualbrain.runtime.manifest import Manifest, load_manifest, state_name
from dualbrain.runtime.spec import ModelSpec
from dualbrain.runtime.state import State


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
        self._linked_inputs = [t for b in manifest.blocks for t in b.inputs]   # model inputs picked by name
        self._output = KINDS[self.head.kind].gives
        self._linked_fetch = [self._output] + [full for outs in self._linked_out for full, _ in outs]
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
                all_logits: bool = False) -> np.ndarray:
        """Feed `ids` (B, T) through the model, updating `state`; returns logits (B, V) of the last
        position (or (B, T, V) with `all_logits`). `pad` (B, T) marks left-padding with 0."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, t = ids.shape
        if state.length + t > self.max_context:
            raise DualbrainError(
                f"sequence of {state.length + t} tokens exceeds the export's maximum context of {self.max_context}"
            )
        new_mask = np.ones((b, t), np.int64) if pad is None else pad.astype(np.int64)
        mask, pos = state.begin(new_mask)
        if not all_logits and self.backend.has_linked:
            logits, outputs = self._forward_linked(ids, mask, pos, state)
        else:
            logits, outputs = self._forward_blocks(ids, mask, pos, state, all_logits)
        state.commit(new_mask, outputs)
        return logits

    def _forward_linked(self, ids, mask, pos, state: State):
        """One call of the whole-model graph: last-position logits (B, V) and each layer's state outputs."""
        feeds = model_feeds(self._linked_inputs, input_ids=ids, attention_mask=mask, position_ids=pos)
        for i, ins in enumerate(self._linked_in):
            st = state.feeds(i)
            feeds.update((full, st[name]) for full, name in ins)
        out = self.backend.run_linked(feeds, self._linked_fetch)
        states = [{name: out[full] for full, name in outs} for outs in self._linked_out]
        return out[self._output][:, -1], states

    def _forward_blocks(self, ids, mask, pos, state: State, all_logits: bool):
        """embed -> layers -> head, each block fed the model inputs it declares and its chain input."""
        def run(block, x, extra=None):
            kind = KINDS[block.kind]
            feeds = model_feeds(block.inputs, input_ids=ids, attention_mask=mask, position_ids=pos)
            if kind.takes:
                feeds[kind.takes] = x
            out = self.backend.run(block, {**feeds, **(extra or {})})
            return out, out[kind.gives]

        _, hidden = run(self.embed, None)
        states = []
        for i, block in enumerate(self.layers):
            out, hidden = run(block, hidden, state.feeds(i))
            states.append({s.output: out[s.output] for s in block.state})
        if not all_logits:
            hidden = np.ascontiguousarray(hidden[:, -1:])
        _, logits = run(self.head, hidden)
        return (logits if all_logits else logits[:, -1]), states
