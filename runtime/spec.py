"""Architecture as data: one dataclass describes any Qwen3.5 / Qwen3.6 text model.

`ModelSpec.from_config(dict)` accepts the four published `model_type`s:
`qwen3_5` / `qwen3_5_moe` (``*ForConditionalGeneration``: text config nested under `text_config`,
weights under `model.language_model.`) and `qwen3_5_text` / `qwen3_5_moe_text` (``*ForCausalLM``:
flat config, weights under `model.`).

It lives in the runtime (stdlib only) because both sides read it: the exporter parses a checkpoint's
config into it, and a manifest's `model` section is read back into it (`ModelSpec.from_json`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualbrain.errors import DualbrainError, read_json_object

# Decoder-layer kinds a config's `layer_types` may name (each is a block kind: runtime.blocks).
LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)

# model_type -> (is_moe, nested text_config, weight prefix of the language model)
MODEL_TYPES: dict[str, tuple[bool, bool, str]] = {
    "qwen3_5": (False, True, "model.language_model."),
    "qwen3_5_moe": (True, True, "model.language_model."),
    "qwen3_5_text": (False, False, "model."),
    "qwen3_5_moe_text": (True, False, "model."),
}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    # gated full attention
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    # gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel: int
    # feed-forward: dense MLP or MoE
    intermediate_size: int
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # ---- derived -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def weight_prefix(self) -> str:
        return MODEL_TYPES[self.model_type][2]

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_num_value_heads * self.linear_value_head_dim

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "ModelSpec":
        """Read back `to_json()` (e.g. from a manifest), checking every field's type."""
        if not isinstance(d, dict):
            raise DualbrainError("model spec must be an object")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise DualbrainError(f"model spec has unknown fields: {sorted(map(str, unknown))}")
        out = {}
        for name, f in fields.items():
            if name not in d:
                if f.default is dataclasses.MISSING:
                    raise DualbrainError(f"model spec is missing field {name!r}")
                continue
            v = d[name]
            if not _matches(v, hints[name]):
                raise DualbrainError(f"model spec field {name!r} has the wrong type: {v!r}")
            out[name] = tuple(v) if isinstance(v, list) else v
        if out["num_layers"] != len(out["layer_types"]) or any(t not in LAYER_TYPES for t in out["layer_types"]):
            raise DualbrainError("model spec: layer_types does not match num_layers")
        return cls(**out)

    # ---- parsing transformers' config.json ---------------------------------------------------------
    @classmethod
    def from_dir(cls, checkpoint: str | Path) -> "ModelSpec":
        path = Path(checkpoint)
        if not path.exists():
            raise DualbrainError(f"checkpoint path does not exist: {path}")
        if not path.is_dir():
            raise DualbrainError(f"checkpoint path is not a directory: {path}")
        if not (path / "config.json").is_file():
            raise DualbrainError(f"no config.json in checkpoint directory {path}")
        config = read_json_object(path / "config.json")
        gen_path = path / "generation_config.json"
        gen = read_json_object(gen_path) if gen_path.is_file() else {}
        return cls.from_config(config, generation_config=gen)

    @classmethod
    def from_config(cls, config: Any, generation_config: dict | None = None) -> "ModelSpec":
        if not isinstance(config, dict):
            raise DualbrainError("config.json must hold a JSON object")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
            raise DualbrainError(
                f"unknown model_type {model_type!r} in config.json (supported: {', '.join(MODEL_TYPES)})"
            )
        is_moe, nested, _ = MODEL_TYPES[model_type]
        text = config.get("text_config") if nested else config
        if not isinstance(text, dict):
            raise DualbrainError(f"config.json of model_type {model_type!r} has no text_config object")
        get = _Getter(text)

        hidden = get.int("hidden_size")
        num_layers = get.int("num_hidden_layers")
        num_heads = get.int("num_attention_heads")
        head_dim = get.int("head_dim", default=hidden // num_heads)
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = get.int("full_attention_interval", default=4)
            layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)]
        if (not isinstance(layer_types, list) or len(layer_types) != num_layers
                or any(t not in LAYER_TYPES for t in layer_types)):
            raise DualbrainError(
                f"config.json: layer_types must list {num_layers} entries of {LINEAR!r} or {FULL!r}"
            )
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise DualbrainError("config.json: rope_parameters must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise DualbrainError(f"config.json: rope_type {rope_type!r} is not supported (only default/mrope)")
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
        theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        if not _is_num(partial) or not 0 < partial <= 1:
            raise DualbrainError(f"config.json: partial_rotary_factor must be in (0, 1], got {partial!r}")
        if not _is_num(theta) or theta <= 0:
            raise DualbrainError(f"config.json: rope_theta must be positive, got {theta!r}")
        rotary_dim = int(head_dim * partial)
        mrope = rope.get("mrope_section", [rotary_dim // 2])
        if (not isinstance(mrope, list) or not all(isinstance(m, int) for m in mrope)
                or sum(mrope) != rotary_dim // 2):
            raise DualbrainError(
                f"config.json: mrope_section {mrope!r} must be integers summing to rotary_dim/2 = {rotary_dim // 2}"
            )

        eos_ids = eos_token_ids((generation_config or {}).get("eos_token_id"),
                                text.get("eos_token_id", config.get("eos_token_id")))
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))

        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=get.int("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            layer_types=tuple(layer_types),
            rms_norm_eps=get.float("rms_norm_eps", default=1e-6),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=get.int("max_position_embeddings", default=32768),
            num_heads=num_heads,
            num_kv_heads=get.int("num_key_value_heads", default=num_heads),
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            rope_theta=float(theta),
            mrope_section=tuple(mrope),
            linear_num_key_heads=get.int("linear_num_key_heads"),
            linear_num_value_heads=get.int("linear_num_value_heads"),
            linear_key_head_dim=get.int("linear_key_head_dim"),
            linear_value_head_dim=get.int("linear_value_head_dim"),
            linear_conv_kernel=get.int("linear_conv_kernel_dim", default=4),
            intermediate_size=0 if is_moe else get.int("intermediate_size"),
            eos_token_ids=tuple(eos_ids),
            pad_token_id=text.get("pad_token_id") if isinstance(text.get("pad_token_id"), int) else None,
        )
        if is_moe:
            kw.update(
                num_experts=get.int("num_experts"),
                num_experts_per_tok=get.int("num_experts_per_tok"),
                moe_intermediate_size=get.int("moe_intermediate_size"),
                shared_expert_intermediate_size=get.int("shared_expert_intermediate_size"),
            )
            if kw["num_experts_per_tok"] > kw["num_experts"]:
                raise DualbrainError("config.json: num_experts_per_tok exceeds num_experts")
        if num_heads % kw["num_kv_heads"]:
            raise DualbrainError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if kw["linear_num_value_heads"] % kw["linear_num_key_heads"]:
            raise DualbrainError("config.json: linear_num_value_heads must be a multiple of linear_num_key_heads")
        return cls(**kw)


def eos_token_ids(*values: Any) -> tuple[int, ...]:
    """EOS ids from `eos_token_id` values (an int, a list of ints, or None), first seen first.

    The one reading of EOS ids: the spec (config + generation config) and the tokenizer
    (its eos token + generation config) both go through it."""
    ids: list[int] = []
    for v in values:
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, int) and not isinstance(x, bool) and x not in ids:
                ids.append(x)
    return tuple(ids)


def _matches(v: Any, hint: Any) -> bool:
    """isinstance for the simple annotations ModelSpec uses (int, float, str, bool, tuples, | None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if hint is type(None):
        return v is None
    if typing.get_origin(hint) is tuple:
        return isinstance(v, (list, tuple)) and all(_matches(x, args[0]) for x in v)
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return _is_num(v)
    return isinstance(v, hint)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Getter:
    """Typed, range-checked access to config fields, with one-line errors naming the key."""

    def __init__(self, d: dict):
        self.d = d

    def int(self, key: str, default: int | None = None) -> int:
        v = self.d.get(key, default)
        if v is None:
            raise DualbrainError(f"config.json: missing required field {key!r}")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > 1 << 40:
            raise DualbrainError(f"config.json: {key} must be a positive integer, got {v!r}")
        return v

    def float(self, key: str, default: float | None = None) -> float:
        v = self.d.get(key, default)
        if not _is_num(v) or v <= 0:
            raise DualbrainError(f"config.json: {key} must be a positive number, got {v!r}")
        return float(v)
