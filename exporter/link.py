"""Link the per-block graphs into one whole-model graph (`model.onnx`) for speed.

The linked graph reuses the blocks' external-data files (initializers keep their locations and
offsets), so linking costs no extra disk and no weight copies. Inputs: `input_ids`,
`attention_mask`, `position_ids` and every layer's state as `{block}.{state input}`; outputs:
`logits` of the LAST position only (B, 1, V) and every layer's new state as `{block}.{state output}`.
One session.run per step instead of one per block.
"""
from __future__ import annotations

from pathlib import Path

from dualbrain.runtime.blocks import KINDS, MODEL_INPUTS
from dualbrain.runtime.manifest import Manifest, state_name

LINKED = "model.onnx"


def _rename_graph(graph, prefix: str, keep: dict[str, str]) -> None:
    """Prefix every value / initializer / node name in `graph` except those mapped in `keep`."""
    def rn(name: str) -> str:
        if not name:
            return name
        return keep.get(name, f"{prefix}/{name}")

    for t in graph.initializer:
        t.name = rn(t.name)
    for n in graph.node:
        n.name = rn(n.name) if n.name else n.name
        n.input[:] = [rn(x) for x in n.input]
        n.output[:] = [rn(x) for x in n.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = rn(vi.name)


def link_blocks(out_dir: Path, manifest: Manifest) -> str:
    """Write `out_dir/model.onnx` from the blocks in `manifest`; returns its file name."""
    import onnx
    from onnx import helper

    graph = helper.make_graph([], "dualbrain_linked", [], [])
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    opsets: dict[str, int] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    prev_hidden = None
    last = manifest.blocks[-1]
    for block in manifest.blocks:
        kind = KINDS[block.kind]
        m = onnx.load(str(out_dir / block.file), load_external_data=False)
        keep = {name: name for name in MODEL_INPUTS}
        if kind.takes is not None:
            keep[kind.takes] = prev_hidden
        if block is last:              # the model's output keeps its name
            keep[kind.gives] = kind.gives
        for s in block.state:
            keep[s.input] = state_name(block.name, s.input)
            keep[s.output] = state_name(block.name, s.output)
        g = m.graph
        _rename_graph(g, block.name, keep)
        hidden_name = keep.get(kind.gives, f"{block.name}/{kind.gives}")
        if kind.last_position_only:
            # only the last position's logits are needed while generating
            last_hidden = f"{block.name}/_last_hidden"
            nodes = [
                helper.make_node("Constant", [], [f"{block.name}/_last_start"], value=helper.make_tensor(
                    "s", onnx.TensorProto.INT64, [1], [-1])),
                helper.make_node("Constant", [], [f"{block.name}/_last_end"], value=helper.make_tensor(
                    "e", onnx.TensorProto.INT64, [1], [2**62])),
                helper.make_node("Constant", [], [f"{block.name}/_last_axis"], value=helper.make_tensor(
                    "a", onnx.TensorProto.INT64, [1], [1])),
                helper.make_node("Slice", [prev_hidden] + [f"{block.name}/_last_{x}" for x in ("start", "end", "axis")],
                                 [last_hidden]),
            ]
            graph.node.extend(nodes)
            for n in g.node:
                n.input[:] = [last_hidden if x == prev_hidden else x for x in n.input]
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.value_info.extend(v for v in g.value_info)
        for vi in g.input:
            if vi.name in keep.values() and vi.name != prev_hidden and vi.name not in inputs:
                inputs[vi.name] = vi
        for vi in g.output:
            if vi.name.startswith(block.name + ".") or (block is last and vi.name == kind.gives):
                graph.output.append(vi)
        for f in m.functions:
            functions.setdefault((f.domain, f.name), f)
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        prev_hidden = hidden_name
    graph.input.extend(inputs.values())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="dualbrain")
    model.ir_version = 10
    model.functions.extend(functions.values())
    onnx.save(model, str(out_dir / LINKED))
    return LINKED
