"""Bridges between the two models of a pair: the one home of their configuration (fused mode).

A bridge reads the small model's hidden states after one of its layers and adds a gated
cross-attention over them to the large model's residual stream after one of its layers (CALM-style,
with Flamingo's output gate `tanh(gate)`, initialised to 0 so an untrained bridge leaves the large
model exactly as it was). Which large layer reads which small layer is data: `BridgeConfig.links`.

Files (written by `dualbrain align`, read by `dualbrain export` and the runtime):
- `bridges.json`: the `BridgeConfig` (shape, links, and the identity of the two models it was
  trained for: hashes of each config, safetensors headers and tokenizer vocabulary);
- `bridges.safetensors`: `bridges.N.{proj,norm_q,norm_kv,q,k,v,o}.weight` and `bridges.N.gate`.
An export of bridges (`dualbrain export BRIDGES -o OUT`) holds `bridge_NNN.onnx` per link and the
same `bridges.json` with the export's dtype and file digests.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dualbrain.errors import DualbrainError, read_json_object

CONFIG = "bridges.json"
WEIGHTS = "bridges.safetensors"
FORMAT = "dualbrain-bridges"
VERSION = 1


@dataclass(frozen=True)
class Link:
    large_layer: int     # the bridge's output is added after this large layer
    small_layer: int     # it reads the small model's hidden states after this layer


@dataclass(frozen=True)
class BridgeShape:
    """What a bridge block's signature needs (`runtime.blocks.bridge_signature`)."""
    hidden_size: int          # the large model's
    small_hidden_size: int
    num_kv_heads: int         # the cross-attention's heads (queries and keys/values alike)
    head_dim: int
    vocab_size: int           # the pair's (tracing makes example ids from it; a bridge takes none)
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class BridgeConfig:
    shape: BridgeShape
    links: tuple[Link, ...]
    large: dict[str, str]               # identity of the large model (Checkpoint.identity)
    small: dict[str, str]
    dtype: str | None = None            # set in an export
    files: dict[str, Any] = field(default_factory=dict)   # an export's file digests
    trained_steps: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["links"] = [asdict(x) for x in self.links]
        return {"format": FORMAT, "version": VERSION, **d}

    def write(self, directory: str | os.PathLike) -> None:
        Path(directory, CONFIG).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    def block_names(self) -> list[str]:
        return [f"bridge_{i:03d}" for i in range(len(self.links))]


def is_bridges_dir(path: str | os.PathLike) -> bool:
    return Path(path, CONFIG).is_file()


def load_config(directory: str | os.PathLike) -> BridgeConfig:
    path = Path(directory, CONFIG)
    if not path.is_file():
        raise DualbrainError(f"{directory}: no {CONFIG} (bridges are written by `dualbrain align`)")
    d = read_json_object(path)
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise DualbrainError(f"{path}: not a {FORMAT} v{VERSION} file")
    try:
        links = tuple(Link(int(x["large_layer"]), int(x["small_layer"])) for x in d["links"])
        cfg = BridgeConfig(BridgeShape(**d["shape"]), links, dict(d["large"]), dict(d["small"]), d.get("dtype"),
                           dict(d.get("files") or {}), int(d.get("trained_steps", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise DualbrainError(f"{path}: malformed ({e})") from None
    if not links:
        raise DualbrainError(f"{path}: no links")
    return cfg


def check_belongs(cfg: BridgeConfig, large_identity: dict | None, small_identity: dict | None,
                  where: str = "bridges") -> None:
    """Refuse bridges trained for other models: each model's recorded identity must match."""
    for role, want, got in (("large", cfg.large, large_identity), ("small", cfg.small, small_identity)):
        if not got:
            raise DualbrainError(f"the {role} export records no model identity (exported before bridges "
                                 "existed): re-export it")
        bad = [k for k in want if got.get(k) != want[k]]
        if bad:
            raise DualbrainError(f"{where} were made for another {role} model (its {', '.join(bad)} differ)")
