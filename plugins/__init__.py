"""Our own ops: one folder per op, each with a numpy reference, a torch op (eager math + single
ONNX node at export), the ONNX function body for ONNX Runtime, and (later) kernels and plugins."""
from __future__ import annotations

import importlib

OPS = ("causal_conv", "gated_delta", "moe_dispatch")
DOMAIN = "dualbrain"


def all_onnx_functions(opset: int) -> list:
    """The ONNX FunctionProtos of every custom op, for default-domain version `opset`."""
    fns = []
    for op in OPS:
        fns.extend(importlib.import_module(f"dualbrain.plugins.{op}.function").onnx_functions(opset))
    return fns
