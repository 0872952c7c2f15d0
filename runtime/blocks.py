"""Block kinds: the one registry of what each kind of block is.

An export is a chain of blocks: `embed` turns token ids into hidden states, one block per decoder
layer (`linear_attention` = Gated DeltaNet, `full_attention` = gated attention, as the config's
`layer_types` say), and `head` turns hidden states into logits. Side blocks sit beside the chain and
are run on their own by a mode: `mtp`, the checkpoint's multi-token-prediction head, exported when the
checkpoint has one. Each kind is one `BlockKind` entry in `KINDS`, declaring once:

- its signature: inputs, outputs and the state it carries between calls, and the outputs its window
  variant adds (the state after every position, for rollback) when it has one (`signature`);
- its place in the chain: the input it takes from the block before and the output it hands on
  (`takes` / `gives`), and whether the linked graph runs it on the last `logits_to_keep` positions only;
- the torch module that computes it at export (`module`, imported lazily: the runtime has no torch);
- for `diff`, how to read its state out of transformers' cache (`reference_state`, lazy too).

The exporter, the linker, the manifest check, the diff and the runtime read this registry; a new
kind is one entry here plus its module. Inputs that are neither the chained hidden state nor state
(`MODEL_INPUTS`: ids, mask, positions) are the model's own and are fed to each block by name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dualbrain.runtime.dtypes import numpy_dtype
from dualbrain.runtime.spec import FULL, LINEAR, ModelSpec

EMBED = "embed"
HEAD = "head"
MTP = "mtp"
BRIDGE = "bridge"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                     # runtime.dtypes name: float32, float16, bfloat16, int64
    shape: tuple[int | str, ...]   # str = dynamic dim (batch, seq, past, total)


@dataclass(frozen=True)
class StateInfo:
    """A state tensor carried between calls: fed as `input`, returned as `output`.

    `append`: `output` holds only the call's own positions along axis 0 (seq-major), which the runtime
    appends to a preallocated cache whose valid prefix (axis 0 = "past") is the next `input`.
    Otherwise `output` replaces `input` whole."""
    input: str
    output: str
    dtype: str
    shape: tuple[int | str, ...]
    window_output: str | None = None   # the window variant's output: this state after every position
    append: bool = False


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    state: tuple[StateInfo, ...] = ()
    window_outputs: tuple[TensorInfo, ...] = ()   # extra outputs of the window variant (none: no variant)


@dataclass(frozen=True)
class BlockKind:
    name: str                                          # the manifest's `kind`
    signature: Callable[[ModelSpec, str], Signature]   # (spec, dtype)
    module: str                 # "module:Class" with .from_checkpoint(spec, checkpoint, layer, torch dtype)
    takes: str | None           # input fed from the previous block's `gives` (None: first in the chain)
    gives: str                  # output handed to the next block (the last block's is the model's output)
    last_positions: bool = False   # the linked graph runs it on the last `logits_to_keep` positions only
    reference_state: str | None = None  # "module:callable" (transformers cache, layer, spec) -> {state input: tensor}
    side: bool = False          # beside the chain, run on its own by a mode (the MTP head): never linked
    quantize: bool = True       # --quant applies to it (the MTP head stays float: quantizing it costs acceptance)
    # weights read from another block's data file instead of a copy: (initializer, block, its initializer)
    shares: tuple[tuple[str, str, str], ...] = ()

    def torch_module(self):
        return _resolve(self.module)

    def read_reference_state(self, cache, layer: int, spec: ModelSpec) -> dict[str, Any]:
        return _resolve(self.reference_state)(cache, layer, spec) if self.reference_state else {}


def _resolve(path: str):
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# ---- signatures ----------------------------------------------------------------------------------

def _hidden(spec: ModelSpec, dtype: str, name: str) -> TensorInfo:
    return TensorInfo(name, dtype, ("batch", "seq", spec.hidden_size))


MASK = TensorInfo("attention_mask", "int64", ("batch", "total"))
NORMALIZE_HIDDEN = TensorInfo("normalize_hidden", "int64", (1,))


def _layer(spec: ModelSpec, dtype: str, extra_inputs: tuple[TensorInfo, ...], states: tuple[StateInfo, ...],
           state_outputs: tuple[TensorInfo, ...], window_outputs: tuple[TensorInfo, ...] = ()) -> Signature:
    """A decoder layer: (hidden, mask, *extra inputs, *state inputs) -> (hidden_out, *state outputs)."""
    ins = (_hidden(spec, dtype, "hidden"), MASK, *extra_inputs,
           *(TensorInfo(s.input, s.dtype, s.shape) for s in states))
    outs = (_hidden(spec, dtype, "hidden_out"), *state_outputs)
    return Signature(ins, outs, states, window_outputs)


def embed_signature(spec: ModelSpec, dtype: str) -> Signature:
    return Signature((TensorInfo("input_ids", "int64", ("batch", "seq")),), (_hidden(spec, dtype, "hidden"),))


def head_signature(spec: ModelSpec, dtype: str) -> Signature:
    return Signature((_hidden(spec, dtype, "hidden"),),
                     (TensorInfo("logits", "float32", ("batch", "seq", spec.vocab_size)),))


def gated_deltanet_signature(spec: ModelSpec, dtype: str) -> Signature:
    """conv + recurrent state, replaced each call; the window variant adds the states after every position."""
    k1 = spec.linear_conv_kernel - 1
    rec_shape = ("batch", spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_value_head_dim)
    states = (
        StateInfo("conv_state", "conv_state_out", dtype, ("batch", spec.conv_dim, k1),
                  "conv_states"),
        StateInfo("recurrent_state", "recurrent_state_out", "float32", rec_shape,
                  "recurrent_states"),
    )
    window_outs = (TensorInfo("conv_states", dtype, ("batch", "seq", spec.conv_dim, k1)),
                   TensorInfo("recurrent_states", "float32", ("batch", "seq") + rec_shape[1:]))
    return _layer(spec, dtype, (), states, tuple(TensorInfo(s.output, s.dtype, s.shape) for s in states), window_outs)


def _kv(spec: ModelSpec, dtype: str) -> tuple[tuple[StateInfo, ...], tuple[TensorInfo, ...]]:
    """An attention layer's appended K/V: the states, and their outputs (this call's positions)."""
    kv_past = ("past", "batch", spec.num_kv_heads, spec.head_dim)
    kv_new = ("seq", "batch", spec.num_kv_heads, spec.head_dim)
    states = (StateInfo("past_key", "new_key", dtype, kv_past, append=True),
              StateInfo("past_value", "new_value", dtype, kv_past, append=True))
    return states, (TensorInfo("new_key", dtype, kv_new), TensorInfo("new_value", dtype, kv_new))


POSITIONS = TensorInfo("position_ids", "int64", ("batch", "seq"))


def gated_attention_signature(spec: ModelSpec, dtype: str) -> Signature:
    """K/V sequence-major, and only this call's positions out: the runtime appends them to its cache
    (runtime.state), so a step never copies or reallocates the whole past."""
    states, outs = _kv(spec, dtype)
    return _layer(spec, dtype, (POSITIONS,), states, outs)


def mtp_signature(spec: ModelSpec, dtype: str) -> Signature:
    """The multi-token-prediction head (one full-attention decoder layer with its own K/V cache).

    Position t takes the hidden state `hidden` at t and the embedding `embedded` of token t+1 and
    predicts token t+2. `normalize_hidden` [1] = 1 applies the model's final norm to `hidden` first
    (a target hidden state entering the head, when the head is fed final-normed states); 0 feeds it as
    is (pre-norm target states, or this head's own `hidden_out` when chaining drafts)."""
    states, kv_outs = _kv(spec, dtype)
    ins = (_hidden(spec, dtype, "hidden"), _hidden(spec, dtype, "embedded"), NORMALIZE_HIDDEN, MASK, POSITIONS,
           *(TensorInfo(s.input, s.dtype, s.shape) for s in states))
    outs = (TensorInfo("logits", "float32", ("batch", "seq", spec.vocab_size)),
            _hidden(spec, dtype, "hidden_out"),     # after mtp.norm: what lm_head reads, and the next draft's hidden
            *kv_outs)
    return Signature(ins, outs, states)


def bridge_signature(shape, dtype: str) -> Signature:
    """A bridge between the pair (runtime/bridges.py; `shape` is a `BridgeShape`): the large model's
    hidden states cross-attend over the small model's (`small_hidden`, this call's positions), whose
    projected keys/values are an appended state like attention K/V; causal over the slots."""
    states, kv_outs = _kv(shape, dtype)
    ins = (_hidden(shape, dtype, "hidden"), TensorInfo("small_hidden", dtype, ("batch", "seq", shape.small_hidden_size)),
           MASK, *(TensorInfo(s.input, s.dtype, s.shape) for s in states))
    return Signature(ins, (_hidden(shape, dtype, "hidden_out"), *kv_outs), states)


# ---- the registry --------------------------------------------------------------------------------

_LAYERS = "dualbrain.exporter.blocks.layers"
KINDS: dict[str, BlockKind] = {k.name: k for k in (
    BlockKind(EMBED, embed_signature, f"{_LAYERS}:Embedding", takes=None, gives="hidden"),
    BlockKind(LINEAR, gated_deltanet_signature, f"{_LAYERS}:DecoderLayer", takes="hidden", gives="hidden_out",
              reference_state=f"{_LAYERS}:GatedDeltaNetMixer.reference_state"),
    BlockKind(FULL, gated_attention_signature, f"{_LAYERS}:DecoderLayer", takes="hidden", gives="hidden_out",
              reference_state=f"{_LAYERS}:GatedAttentionMixer.reference_state"),
    BlockKind(HEAD, head_signature, f"{_LAYERS}:Head", takes="hidden", gives="logits", last_positions=True),
    BlockKind(MTP, mtp_signature, f"{_LAYERS}:MtpHead", takes="hidden", gives="logits", side=True,
              quantize=False, shares=(("lm_head", HEAD, "lm_head"),)),
    BlockKind(BRIDGE, bridge_signature, "dualbrain.exporter.blocks.bridge:Bridge", takes="hidden",
              gives="hidden_out", side=True, quantize=False),
)}


@dataclass(frozen=True)
class PlannedBlock:
    name: str
    kind: BlockKind
    layer: int | None = None    # decoder layer index (blocks that carry per-layer state)


def model_blocks(spec: ModelSpec) -> list[PlannedBlock]:
    """The blocks of a model, in chain order: embed, one per decoder layer (its layer type), head."""
    return ([PlannedBlock(EMBED, KINDS[EMBED])]
            + [PlannedBlock(f"layer_{i:03d}", KINDS[t], i) for i, t in enumerate(spec.layer_types)]
            + [PlannedBlock(HEAD, KINDS[HEAD])])


# ---- the model's own inputs ---------------------------------------------------------------------

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# The linked whole-model graph's own extras: how many last positions get logits (and final hidden
# states, MTP's input); the chain's hidden state entering the last-positions block, for those positions.
LOGITS_TO_KEEP = TensorInfo("logits_to_keep", "int64", (1,))
LAST_HIDDEN = "last_hidden"


def model_feeds(block_inputs, **values: np.ndarray) -> dict[str, np.ndarray]:
    """The model-level inputs (`MODEL_INPUTS`) among `block_inputs`, from `values` by name."""
    return {t.name: values[t.name] for t in block_inputs if t.name in MODEL_INPUTS}


def random_feeds(inputs, vocab_size: int, *, batch: int = 2, seq: int = 5, past: int = 3, seed: int = 0,
                 float_dtype: Callable[[str], Any] = numpy_dtype) -> dict[str, np.ndarray]:
    """Inputs of the right shapes for a block: random ids and floats, a full mask, positions after `past`.

    For tracing at export and for backend-vs-backend comparisons. `float_dtype` maps a float
    input's manifest dtype to the numpy dtype to make it in."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    feeds = {}
    for t in inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.name == "input_ids":
            feeds[t.name] = rng.integers(0, vocab_size, shape).astype(np.int64)
        elif t.name == "attention_mask":
            feeds[t.name] = np.ones(shape, np.int64)
        elif t.name == "position_ids":
            feeds[t.name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), shape).copy()
        elif t.dtype == "int64":       # a flag such as normalize_hidden
            feeds[t.name] = rng.integers(0, 2, shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(float_dtype(t.dtype))
    return feeds
