"""Window variants: a block's graph that also returns its state after every position (for rollback).

Made from the finished plain graph by swapping each custom op that produces a state output for its
window variant (the op's identity names it: `CausalConv1d` -> `CausalConv1dWindow`, `GatedDeltaRule`
-> `GatedDeltaRuleWindow`), whose extra output is the per-position state. Nothing is traced again and
no weight is copied: the variant's initializers keep the plain graph's external-data locations, so
both graphs read one data file (quantized weights included).
"""
from __future__ import annotations

from pathlib import Path

from dualbrain.errors import DualbrainError
from dualbrain.runtime.blocks import Signature
from dualbrain.runtime.dtypes import dtype as dtype_info


def write_window_variant(plain: Path, out: Path, sig: Signature) -> None:
    """Write the window variant of the graph at `plain` (same directory) to `out`."""
    import onnx
    from onnx import helper

    from dualbrain.plugins import attach_functions, identities

    if plain.parent.resolve() != out.parent.resolve():
        raise DualbrainError(f"{out} must be beside {plain}: they share its external data")
    window_of = {(i.domain, i.op_type): i.window_op_type for i in identities() if i.window_op_type}
    model = onnx.load(str(plain), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    extra = {t.name: t for t in sig.window_outputs}
    for s in sig.state:
        if s.window_output is None:
            continue
        node = producers.get(s.output)
        if node is None or (node.domain, node.op_type) not in window_of:
            raise DualbrainError(f"{plain.name}: state {s.output} does not come from an op with a window variant")
        node.op_type = window_of[(node.domain, node.op_type)]
        node.output.append(s.window_output)
        t = extra[s.window_output]
        model.graph.output.append(helper.make_tensor_value_info(
            t.name, dtype_info(t.dtype).onnx, list(t.shape)))
    attach_functions(model, used_only=True)
    onnx.save(model, str(out))
