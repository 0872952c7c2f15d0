"""``dualbrain::CausalConv1d`` / ``CausalConv1dWindow``: Gated DeltaNet short conv with carried state.

``causal_conv1d`` (torch) is imported lazily so the runtime side needs no torch.
"""
from .function import DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION, onnx_functions
from .reference import causal_conv1d as causal_conv1d_reference

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "causal_conv1d",
           "causal_conv1d_reference", "onnx_functions"]


def __getattr__(name):
    if name == "causal_conv1d":
        from .op import causal_conv1d
        return causal_conv1d
    raise AttributeError(name)
