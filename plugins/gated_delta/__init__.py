"""``dualbrain::GatedDeltaRule`` / ``GatedDeltaRuleWindow``: Gated DeltaNet recurrence with state.

``gated_delta_rule`` (torch) is imported lazily so the runtime side needs no torch.
"""
from .function import DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION, onnx_functions
from .reference import gated_delta_rule as gated_delta_rule_reference

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "gated_delta_rule",
           "gated_delta_rule_reference", "onnx_functions"]


def __getattr__(name):
    if name == "gated_delta_rule":
        from .op import gated_delta_rule
        return gated_delta_rule
    raise AttributeError(name)
