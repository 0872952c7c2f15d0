"""Per-row state: what each row of a batch carries between forward calls, and how it goes back.

Two kinds of state tensor (`StateInfo.append` in the manifest):
- replaced (GDN conv and recurrent state), (batch, ...): each call returns the new one;
- appended (attention K/V): each call returns only its own positions, sequence-major
  (seq, batch, heads, dim). They are copied into a preallocated buffer (capacity, batch, heads, dim);
  the first `length` slots (the longest row's) are fed back as the next call's past, a view that
  copies nothing. A (batch, capacity) mask says which slots hold a row's real tokens.

Each row has its own length (slots it has used, holes from left padding included) and position, so
one call serves rows of different ages: row b writes its new K/V at its own offset, and the slots
between its length and the longest row's are masked. RoPE is applied before caching, so slot order
does not matter. A call's new tokens may be padded on the left (a prefill from an empty state: a
zero input leaves a zero GDN state at zero) or on the right (a ragged call, e.g. verifying different
numbers of drafts per row): then each row's GDN state is taken at its own last real position from
the window variant's per-position states.

Rollback: after `mark()`, every call records per row, for each real token, the slot it ended at and
its GDN states (the window variant's per-position states for multi-token calls; a single-token call's
own outputs). `rollback(row, n)` returns the row to n tokens after the mark (0 = the mark itself)
without re-running anything: GDN states are the recorded ones, attention layers just move the length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from dualbrain.runtime.manifest import BlockInfo


@dataclass
class Step:
    """One call in progress (`State.begin` .. `State.commit`): what the blocks are fed, and what they return."""
    new_mask: np.ndarray          # (batch, t): 1 real token, 0 padding
    mask: np.ndarray              # (batch, length + t): the attention mask over past slots and new tokens
    positions: np.ndarray         # (batch, t): position ids of the new tokens
    window: bool                  # the GDN layers must run their window variants (per-position states)
    keep: np.ndarray              # (batch,): tokens up to each row's last real one (trailing padding dropped)
    outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)   # layer -> outputs by name

    @property
    def t(self) -> int:
        return self.new_mask.shape[1]


@dataclass
class _Token:
    slot_end: int                          # the row's length once this token was written
    states: list[dict[str, np.ndarray]]    # per layer: replaced state input name -> this row's state


@dataclass
class _Mark:
    lengths: np.ndarray
    positions: np.ndarray
    states: list[dict[str, np.ndarray]]    # per layer: replaced state arrays at the mark (whole batch)
    tokens: list[list[_Token]]             # per row: real tokens since the mark


class State:
    def __init__(self, blocks: Sequence[BlockInfo], batch: int, capacity: int, max_capacity: int,
                 np_dtype: Callable[[str], type]):
        if capacity < 1 or batch < 1:
            raise ValueError("batch and capacity must be positive")
        self.batch = batch
        self.capacity = min(capacity, max_capacity)
        self.max_capacity = max_capacity
        self.lengths = np.zeros(batch, np.int64)     # slots each row has used (left-padding holes included)
        self.positions = np.zeros(batch, np.int64)   # next position id of each row (padding not counted)
        self._blocks = list(blocks)
        self._mask = np.zeros((batch, self.capacity), np.int64)
        self._mark: _Mark | None = None
        self.layers: list[dict[str, np.ndarray]] = []   # replaced: current array; appended: whole buffer
        for b in self._blocks:
            st = {}
            for s in b.state:
                dims = {"batch": batch, "past": self.capacity if s.append else 0}
                shape = tuple(dims[d] if isinstance(d, str) else d for d in s.shape)
                # np.zeros: a large buffer is mapped lazily, so resident memory grows as rows are written
                st[s.input] = np.zeros(shape, dtype=np_dtype(s.dtype))
            self.layers.append(st)

    # ---- what the next call sees ---------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Slots fed as the next call's past: the longest row's length."""
        return int(self.lengths.max())

    @property
    def mask(self) -> np.ndarray:
        """(batch, length) mask of the past: 0 marks padding and the slots past a row's own length."""
        return self._mask[:, :self.length]

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        """Layer `i`'s state inputs for the next call (appended ones: the valid prefix, no copy)."""
        n = self.length
        return {s.input: self.layers[i][s.input][:n] if s.append else self.layers[i][s.input]
                for s in self._blocks[i].state}

    def reserve(self, new: int) -> None:
        """Make room for `new` more positions, growing the buffers (doubling, up to the maximum)."""
        need = self.length + new
        if need <= self.capacity:
            return
        if need > self.max_capacity:
            raise ValueError(f"{need} positions exceed the maximum of {self.max_capacity}")
        cap = min(max(need, 2 * self.capacity), self.max_capacity)
        keep = self.length
        self._mask = _grown(self._mask, cap, axis=1, keep=keep)
        for b, st in zip(self._blocks, self.layers):
            for s in b.state:
                if s.append:
                    st[s.input] = _grown(st[s.input], cap, axis=0, keep=keep)
        self.capacity = cap

    # ---- one call -------------------------------------------------------------------------------------
    def begin(self, new_mask: np.ndarray, *, window: bool | None = None) -> Step:
        """Start a call over `new_mask` (batch, t) (0 = padding). Nothing changes until `commit`.

        `window` (default: when needed) runs the GDN layers' window variants: needed when a row's
        last token is padding but it has real ones (its state is taken at its last real token), and
        for multi-token calls after a mark (their per-position states are what rollback returns to)."""
        new_mask = np.asarray(new_mask, np.int64)
        t = new_mask.shape[1]
        self.reserve(t)
        keep = _kept(new_mask)
        if window is None:
            window = bool(((keep > 0) & (keep < t)).any()) or (self._mark is not None and t > 1)
        n = self.length
        mask = np.concatenate([self._mask[:, :n], new_mask], axis=1)
        # positions count only real tokens; padding gets position 0 (it is masked anyway)
        pos = self.positions[:, None] + np.cumsum(new_mask, axis=1) - 1
        pos = np.where(new_mask > 0, pos, 0).astype(np.int64)
        return Step(new_mask, mask, pos, window, keep)

    def commit(self, step: Step) -> None:
        """Finish `step`: write each layer's returned state (`step.outputs[i]`, by output name)."""
        new_mask, t, keep = step.new_mask, step.t, step.keep
        old = self.lengths.copy()
        same = bool((old == old[0]).all())
        whole = bool((keep == t).all())         # no row ends in padding
        rows = range(self.batch)
        if same:
            self._mask[:, old[0]:old[0] + t] = new_mask
        if not (same and whole):
            for b in rows:
                if not same:
                    self._mask[b, old[b]:old[b] + t] = new_mask[b]
                if keep[b] < t:
                    self._mask[b, old[b] + keep[b]:old[b] + t] = 0     # trailing padding is not kept
        for i, (blk, st) in enumerate(zip(self._blocks, self.layers)):
            out = step.outputs[i]
            for s in blk.state:
                if s.append:
                    if same:
                        st[s.input][old[0]:old[0] + t] = out[s.output]
                    else:
                        for b in rows:
                            st[s.input][old[b]:old[b] + t, b] = out[s.output][:, b]
                elif whole:
                    st[s.input] = out[s.output]
                else:
                    new = out[s.output].copy()
                    for b in rows:
                        if keep[b] == 0:
                            new[b] = st[s.input][b]                       # no real token: unchanged
                        elif keep[b] < t:
                            new[b] = out[s.window_output][b, keep[b] - 1]
                    st[s.input] = new
        if self._mark is not None:
            self._record(step, old)
        self.lengths = old + keep
        self.positions = self.positions + new_mask.sum(axis=1)

    # ---- rollback -------------------------------------------------------------------------------------
    def mark(self) -> None:
        """From here on, keep what is needed to return any row to any position since now."""
        self._mark = _Mark(self.lengths.copy(), self.positions.copy(),
                           [{s.input: st[s.input] for s in b.state if not s.append}
                            for b, st in zip(self._blocks, self.layers)],
                           [[] for _ in range(self.batch)])

    def unmark(self) -> None:
        self._mark = None

    def tokens_since_mark(self, row: int) -> int:
        return len(self._mark.tokens[row]) if self._mark is not None else 0

    def rollback(self, row: int, n: int) -> None:
        """Return `row` to `n` real tokens after the mark (0: the mark itself), re-running nothing."""
        if self._mark is None:
            raise ValueError("rollback needs a mark")
        tokens = self._mark.tokens[row]
        if not 0 <= n <= len(tokens):
            raise ValueError(f"row {row} has {len(tokens)} tokens since the mark, cannot keep {n}")
        if n == len(tokens):
            return
        if n == 0:
            length = self._mark.lengths[row]
            states = [{k: v[row] for k, v in layer.items()} for layer in self._mark.states]
        else:
            length, states = tokens[n - 1].slot_end, tokens[n - 1].states
        for st, layer in zip(self.layers, states):
            for k, v in layer.items():
                st[k] = st[k].copy()     # the current array may be shared with recorded states
                st[k][row] = v
        self._mask[row, length:] = 0
        self.lengths[row] = length
        self.positions[row] = self._mark.positions[row] + n
        del tokens[n:]

    def _record(self, step: Step, old: np.ndarray) -> None:
        real = step.new_mask > 0
        for b in range(self.batch):
            for j in np.flatnonzero(real[b]):
                states = []
                for i, blk in enumerate(self._blocks):
                    out = step.outputs[i]
                    states.append({s.input: (out[s.output][b] if step.t == 1 else out[s.window_output][b, j])
                                   for s in blk.state if not s.append})
                self._mark.tokens[b].append(_Token(int(old[b] + j + 1), states))

    # ---- rows in and out ------------------------------------------------------------------------------
    def evict(self, row: int) -> None:
        """Free `row`: empty cache, zero state; the other rows are untouched."""
        for b, st in zip(self._blocks, self.layers):
            for s in b.state:
                if not s.append:
                    st[s.input] = st[s.input].copy()
                    st[s.input][row] = 0
        self._mask[row] = 0
        self.lengths[row] = 0
        self.positions[row] = 0
        if self._mark is not None:
            self._mark.tokens[row].clear()
            self._mark.lengths[row] = self._mark.positions[row] = 0
            self._mark.states = [{k: _with_row(v, row, 0) for k, v in layer.items()} for layer in self._mark.states]

    def insert(self, row: int, src: "State", src_row: int = 0) -> None:
        """Move `src`'s row `src_row` (e.g. a request prefilled on its own) into this state's `row`."""
        n = int(src.lengths[src_row])
        self.evict(row)
        if n > self.capacity:
            self.reserve(n - self.length)
        self._mask[row, :n] = src._mask[src_row, :n]
        for b, st, sst in zip(self._blocks, self.layers, src.layers):
            for s in b.state:
                if s.append:
                    st[s.input][:n, row] = sst[s.input][:n, src_row]
                else:
                    st[s.input][row] = sst[s.input][src_row]      # evict made it a private copy
        self.lengths[row] = n
        self.positions[row] = src.positions[src_row]
        if self._mark is not None:
            self._mark.lengths[row], self._mark.positions[row] = n, src.positions[src_row]
            self._mark.states = [{k: _with_row(v, row, st[k][row]) for k, v in layer.items()}
                                 for layer, st in zip(self._mark.states, self.layers)]


def _kept(new_mask: np.ndarray) -> np.ndarray:
    """Per row: tokens up to and including the last real one (trailing padding is dropped)."""
    t = new_mask.shape[1]
    if new_mask.all():
        return np.full(new_mask.shape[0], t, np.int64)
    has = new_mask.any(axis=1)
    last = t - 1 - np.argmax(new_mask[:, ::-1] > 0, axis=1)
    return np.where(has, last + 1, 0).astype(np.int64)


def _with_row(a: np.ndarray, row: int, value) -> np.ndarray:
    a = a.copy()
    a[row] = value
    return a


def _grown(a: np.ndarray, size: int, *, axis: int, keep: int) -> np.ndarray:
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape, a.dtype)
    index = (slice(None),) * axis + (slice(0, keep),)
    out[index] = a[index]
    return out
