"""``dualbrain::MoEDispatch``: Qwen3.5-MoE sparse expert dispatch (router softmax/top-k + SwiGLU
experts + weighted combine; the shared expert is not part of the op).

* :mod:`.reference` -- NumPy reference (``reference.moe_dispatch``).
* :mod:`.op` -- torch function: eager compute, one custom ONNX node under dynamo export.
* :mod:`.function` -- ONNX FunctionProto (exact math) for ONNX Runtime.

Importing this package does not import torch; the torch names are loaded lazily.
"""
from __future__ import annotations

from . import reference
from .reference import DOMAIN, OP_TYPE, VERSION
from .reference import deinterleave_gate_up as deinterleave_gate_up_np
from .reference import interleave_gate_up as interleave_gate_up_np

__all__ = ["DOMAIN", "OP_TYPE", "VERSION", "reference", "moe_dispatch", "route",
           "interleave_gate_up", "deinterleave_gate_up", "interleave_gate_up_np",
           "deinterleave_gate_up_np", "onnx_functions", "add_functions_to_model"]

_LAZY = {
    "moe_dispatch": "op", "route": "op", "interleave_gate_up": "op", "deinterleave_gate_up": "op",
    "onnx_functions": "function", "add_functions_to_model": "function",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(name)
