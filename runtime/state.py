"""Per-generation state: what one generation carries between forward calls.

Two kinds of state tensor (`StateInfo.append` in the manifest):
- replaced (GDN conv and recurrent state): fixed size; each call returns the new one;
- appended (attention K/V): each call returns only its own positions, sequence-major
  (seq, batch, heads, dim). They are copied into a preallocated buffer (capacity, batch, heads, dim)
  whose first `length` rows are fed back as the next call's past: a prefix of a sequence-major
  buffer is contiguous, so feeding it copies nothing. The attention mask lives in a (batch, capacity)
  buffer the same way.

So a decode step allocates nothing that grows with the context: memory over a long generation is the
buffers' pages as they are written (the KV cache's own bytes), not a fresh past+1 copy per step that
the allocator cannot reuse. Going back to an earlier length (speculative rollback of attention
layers) is `length` moving back.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from dualbrain.runtime.manifest import BlockInfo


class State:
    def __init__(self, blocks: Sequence[BlockInfo], batch: int, capacity: int, max_capacity: int,
                 np_dtype: Callable[[str], type]):
        if capacity < 1 or batch < 1:
            raise ValueError("batch and capacity must be positive")
        self.batch = batch
        self.capacity = min(capacity, max_capacity)
        self.max_capacity = max_capacity
        self.length = 0
        self.positions = np.zeros(batch, np.int64)   # next position id of each row (padding not counted)
        self._blocks = list(blocks)
        self._mask = np.zeros((batch, self.capacity), np.int64)
        self.layers: list[dict[str, np.ndarray]] = []   # replaced: current array; appended: whole buffer
        for b in self._blocks:
            st = {}
            for s in b.state:
                dims = {"batch": batch, "past": self.capacity if s.append else 0}
                shape = tuple(dims[d] if isinstance(d, str) else d for d in s.shape)
                # np.zeros: a large buffer is mapped lazily, so resident memory grows as rows are written
                st[s.input] = np.zeros(shape, dtype=np_dtype(s.dtype))
            self.layers.append(st)

    @property
    def mask(self) -> np.ndarray:
        """(batch, length) attention mask so far: 0 marks left padding."""
        return self._mask[:, :self.length]

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        """Layer `i`'s state inputs for the next call (appended ones: the valid prefix, no copy)."""
        return {s.input: self.layers[i][s.input][:self.length] if s.append else self.layers[i][s.input]
                for s in self._blocks[i].state}

    def reserve(self, new: int) -> None:
        """Make room for `new` more positions, growing the buffers (doubling, up to the maximum)."""
        need = self.length + new
        if need <= self.capacity:
            return
        if need > self.max_capacity:
            raise ValueError(f"{need} positions exceed the maximum of {self.max_capacity}")
        cap = min(max(need, 2 * self.capacity), self.max_capacity)
        self._mask = _grown(self._mask, cap, axis=1, keep=self.length)
        for b, st in zip(self._blocks, self.layers):
            for s in b.state:
                if s.append:
                    st[s.input] = _grown(st[s.input], cap, axis=0, keep=self.length)
        self.capacity = cap

    def begin(self, new_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start a call over `new_mask` (batch, t) (0 = left padding): returns the call's attention
        mask (batch, length + t) and position ids (batch, t). Nothing is final until `commit`."""
        t = new_mask.shape[1]
        self.reserve(t)
        self._mask[:, self.length:self.length + t] = new_mask
        # positions count only real tokens; padding gets position 0 (it is masked anyway)
        pos = self.positions[:, None] + np.cumsum(new_mask, axis=1) - 1
        pos = np.where(new_mask > 0, pos, 0).astype(np.int64)
        return np.ascontiguousarray(self._mask[:, :self.length + t]), pos

    def commit(self, new_mask: np.ndarray, outputs: Sequence[dict[str, np.ndarray]]) -> None:
        """Finish the call begun with `new_mask`: each layer's state outputs, by output name."""
        t = new_mask.shape[1]
        for b, st, out in zip(self._blocks, self.layers, outputs):
            for s in b.state:
                if s.append:
                    st[s.input][self.length:self.length + t] = out[s.output]
                else:
                    st[s.input] = out[s.output]
        self.length += t
        self.positions = self.positions + new_mask.sum(axis=1)


def _grown(a: np.ndarray, size: int, *, axis: int, keep: int) -> np.ndarray:
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape, a.dtype)
    index = (slice(None),) * axis + (slice(0, keep),)
    out[index] = a[index]
    return out
