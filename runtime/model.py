"""A loaded export: manifest + backend sessions + tokenizer. Loaded once, serves many generations.

`Model.forward(ids, state)` runs embed -> layers -> head over new tokens, updating the
generation's own `State` (KV for attention layers, conv + recurrent state for GDN layers).
Nothing here imports torch or transformers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dualbrain.errors import DualbrainError, read_json_object
from dualbrain.runtime.backends import Backend, load_backend
from dualbrain.runtime.manifest import Manifest, load_manifest

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass
class State:
    """Per-generation state: one dict of arrays per layer, plus the attention mask so far.

    `mask` is (B, total) int64 with 0 for left padding; `length` counts positions fed so far.
    """
    layers: list[dict[str, np.ndarray]]
    mask: np.ndarray
    positions: np.ndarray   # (B,) next position id of each row

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class Model:
    def __init__(self, model_dir: Path, manifest: Manifest, backend: Backend):
        self.dir = model_dir
        self.manifest = manifest
        self.backend = backend
        self.spec = manifest.model
        self.vocab_size = int(self.spec["vocab_size"])
        self.max_context = manifest.max_context
        self.dtype = backend.compute_dtype(manifest.dtype)
        self.embed = manifest.block("embed")
        self.head = manifest.block("head")
        self.layers = manifest.layers
        self._has_attention = any(b.kind == "full_attention" for b in self.layers)
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
        ids = list(self.spec.get("eos_token_ids") or ())
        if not ids and self.manifest.tokenizer_files:
            ids = list(self.tokenizer.eos_ids)
        return tuple(ids)

    # ---- state -------------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> State:
        layers = []
        for b in self.layers:
            st = {}
            for s in b.state:
                shape = tuple(batch if d == "batch" else 0 if d == "past" else d for d in s.shape)
                st[s.input] = np.zeros(shape, dtype=self.np_dtype(s.dtype))
            layers.append(st)
        return State(layers, np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64))

    def np_dtype(self, dtype: str):
        """The numpy dtype this backend feeds/returns for a manifest dtype."""
        if dtype == "bfloat16":
            return np.float32 if self.dtype == "float32" else NP_DTYPES[dtype]
        return NP_DTYPES[dtype]

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
        mask = np.concatenate([state.mask, new_mask], axis=1)
        # positions count only real tokens; padding gets position 0 (it is masked anyway)
        pos = state.positions[:, None] + np.cumsum(new_mask, axis=1) - 1
        pos = np.where(new_mask > 0, pos, 0).astype(np.int64)
        if not all_logits and getattr(self.backend, "has_linked", False):
            logits = self._forward_linked(ids, mask, pos, state)
        else:
            logits = self._forward_blocks(ids, mask, pos, state, all_logits)
        state.mask = mask
        state.positions = state.positions + new_mask.sum(axis=1)
        return logits

    def _forward_linked(self, ids, mask, pos, state: State) -> np.ndarray:
        """One call of the whole-model graph; returns last-position logits (B, V)."""
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._has_attention:
            feeds["position_ids"] = pos
        outputs = ["logits"]
        for block, st in zip(self.layers, state.layers):
            for s in block.state:
                feeds[f"{block.name}.{s.input}"] = st[s.input]
                outputs.append(f"{block.name}.{s.output}")
        out = self.backend.run_linked(feeds, outputs)
        for block, st in zip(self.layers, state.layers):
            for s in block.state:
                st[s.input] = out[f"{block.name}.{s.output}"]
        return out["logits"][:, -1]

    def _forward_blocks(self, ids, mask, pos, state: State, all_logits: bool) -> np.ndarray:
        hidden = self.backend.run(self.embed, {"input_ids": ids})["hidden"]
        for block, st in zip(self.layers, state.layers):
            feeds = {"hidden": hidden, "attention_mask": mask, **st}
            if block.kind == "full_attention":
                feeds["position_ids"] = pos
            out = self.backend.run(block, feeds)
            hidden = out["hidden_out"]
            for s in block.state:
                st[s.input] = out[s.output]
        if not all_logits:
            hidden = np.ascontiguousarray(hidden[:, -1:])
        logits = self.backend.run(self.head, {"hidden": hidden})["logits"]
        return logits if all_logits else logits[:, -1]
