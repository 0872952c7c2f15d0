"""Shared fixtures: tiny checkpoints and their exports, made once per test session.

Exports are the slow part (seconds per block), so every test that needs one asks `exported(...)`
and gets the cached directory.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)


class Artifacts:
    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[tuple, Path] = {}

    def checkpoint(self, family: str, layout: str = "conditional", experts: str = "stacked", *,
                   dtype: str = "float32", shards: int = 1, tie: bool = False, seed: int = 0,
                   attention: str = "tiny", context: int | None = None) -> Path:
        """`context`: the config's max_position_embeddings (default: make_tiny's, 512)."""
        from dualbrain.exporter.tiny import make_tiny

        key = ("ckpt", family, layout, experts, dtype, shards, tie, seed, attention) + ((context,) if context else ())
        if key not in self.cache:
            out = self.root / "-".join(map(str, key[1:]))
            make_tiny(out, family=family, layout=layout, experts=experts, dtype=dtype, shards=shards, seed=seed,
                      tie_embeddings=tie, attention=attention, max_position_embeddings=context)
            self.cache[key] = out
        return self.cache[key]

    def export(self, ckpt: Path, *, dtype: str = "float32", window: bool = False, quant: str | None = None) -> Path:
        from dualbrain.exporter.export import export_checkpoint

        key = ("export", ckpt, dtype, window) + ((quant,) if quant else ())
        if key not in self.cache:
            out = ckpt.with_name(f"{ckpt.name}.onnx-{dtype}{'-window' if window else ''}{'-' + quant if quant else ''}")
            export_checkpoint(ckpt, out, dtype=dtype, window=window, quant=quant)
            self.cache[key] = out
        return self.cache[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("artifacts"))


# The fp32 parity matrix: both families, both layouts, both expert formats (MoE), plus sharding and
# tied embeddings on some of them so those loader paths run end to end, plus the published attention
# geometry (16 query / 2 KV heads of 256 dims, rotary over 64, M-RoPE sections [11, 11, 10]).
FP32_CASES = {
    "dense-conditional": dict(family="dense", layout="conditional", shards=2),
    "dense-causal-tied": dict(family="dense", layout="causal", tie=True),
    "moe-conditional-stacked": dict(family="moe", layout="conditional", experts="stacked"),
    "moe-conditional-per_expert": dict(family="moe", layout="conditional", experts="per_expert", shards=3),
    "moe-causal-stacked": dict(family="moe", layout="causal", experts="stacked"),
    "moe-causal-per_expert": dict(family="moe", layout="causal", experts="per_expert"),
    "moe-causal-published_attention": dict(family="moe", layout="causal", attention="published"),
}
