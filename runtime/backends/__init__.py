"""Backends run one exported block at a time behind one interface (`Backend.run`).

Each backend lives in its own module and imports its framework lazily, so choosing ONNX Runtime
never imports TensorRT (and vice versa).
"""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.manifest import BlockInfo

BACKENDS = {"onnxruntime": "dualbrain.runtime.backends.onnxruntime",
            "tensorrt": "dualbrain.runtime.backends.tensorrt"}


class Backend(Protocol):
    name: str
    has_linked: bool     # whether `run_linked` can run the export's whole-model graph
    # what one call may hold, from the engines' profiles (None: no limit): rows, and new positions per row
    max_batch: int | None
    max_new_positions: int | None

    def run(self, block: BlockInfo, feeds: dict[str, np.ndarray], *, window: bool = False) -> dict[str, np.ndarray]:
        """Run `block` (its window variant with `window`) on `feeds`; returns outputs by name. Thread-safe."""

    def run_linked(self, feeds: dict[str, np.ndarray], outputs: list[str], *, window: bool = False
                   ) -> dict[str, np.ndarray]:
        """Run the linked whole-model graph (only when `has_linked`; the one linked from the window
        variants with `window`); returns `outputs` by name."""

    def compute_dtype(self, dtype: str) -> str:
        """The dtype this backend computes a given exported dtype in (e.g. bf16 -> fp32 on CPU)."""


def load_backend(name: str, model_dir, manifest, **options) -> Backend:
    if name not in BACKENDS:
        raise DualbrainError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name]).load(model_dir, manifest, **options)
