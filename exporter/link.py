"""Link the per-block graphs into one whole-model graph (`model.onnx`) for speed.

The linked graph reuses the blocks' external-data files (initializers keep their locations and
offsets), so linking costs no extra disk and no weight copies. Inputs: `input_ids`,
`attention_mask`, `position_ids`, `logits_to_keep` (N, shape [1]) and every layer's state as
`{block}.{state input}`; outputs: `logits` of the last N positions (B, N, V), `last_hidden`, the
hidden states entering the head at those positions (B, N, H), and every layer's new state as
`{block}.{state output}`. One session.run per step instead of one per block.

`model.window.onnx` links the blocks' window variants instead, and also returns each layer's
per-position states (`{block}.{window output}`), for calls that may be rolled back.

Each block's graph computes its own sizes (the sequence length from its hidden state, the past from
its cache) and carries its own copies of small constants (rotary frequencies, shape constants). The
linked graph shares both (`_share_dims`, `_share_constants`), so ONNX Runtime's common-subexpression
pass computes a size, and what is derived from it alone (reshape targets, the mask's slices, the
rotary angles), once per step instead of once per layer: a decode step of the mid-size MoE runs 463
nodes instead of 619 in float32, 331 instead of 487 in int4 (tests/benchmarks/RESULTS.md, thirteenth pass).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dualbrain.runtime.blocks import KINDS, LAST_HIDDEN, LOGITS_TO_KEEP, MODEL_INPUTS
from dualbrain.runtime.manifest import Manifest, state_name

LINKED = "model.onnx"
LINKED_WINDOW = "model.window.onnx"


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


def _share_dims(graph, shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Point every one-dim `Shape` slice of a tensor in `shapes` (linked name -> its signature's shape)
    at the first tensor that names that dim. The block signatures promise it: within one call, dims of
    one name (batch, seq, past, total) are equal."""
    from onnx import helper

    first: dict[str, tuple[str, int]] = {}
    for name, shape in shapes.items():        # chain order: the model's inputs come first
        for axis, dim in enumerate(shape):
            if isinstance(dim, str):
                first.setdefault(dim, (name, axis))
    for node in graph.node:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] not in shapes:
            continue
        shape = shapes[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = (min(max(v + len(shape) if v < 0 else v, 0), len(shape))
                      for v in (attrs.get("start", 0), attrs.get("end", len(shape))))
        if end - start != 1 or not isinstance(shape[start], str):
            continue
        node.input[0], axis = first[shape[start]]
        # the attributes rewritten even where the source stays: ONNX Runtime's CSE tells nodes apart by
        # their attributes' order too
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("start", axis), helper.make_attribute("end", axis + 1)])


def _share_constants(graph) -> None:
    """Keep one of each set of identical inline initializers, the nodes reading the others renamed to
    it. (External ones are weights: each block's own.)"""
    import onnx

    kept: dict[bytes, str] = {}
    alias: dict[str, str] = {}
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        unnamed = onnx.TensorProto()
        unnamed.CopyFrom(t)
        unnamed.name = ""
        alias[t.name] = kept.setdefault(unnamed.SerializeToString(deterministic=True), t.name)
    alias = {a: b for a, b in alias.items() if a != b}
    if alias:
        for node in _nodes(graph):
            node.input[:] = [alias.get(x, x) for x in node.input]
        kept_inits = [t for t in graph.initializer if t.name not in alias]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)


def _nodes(graph) -> Iterable:
    """`graph`'s nodes and its subgraphs' (If / Loop bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for a in node.attribute:
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subgraphs:
                yield from _nodes(sub)


def link_blocks(out_dir: Path, manifest: Manifest, *, window: bool = False) -> str:
    """Write `out_dir/model.onnx` (`model.window.onnx` from the window variants) from the blocks in
    `manifest`; returns its file name."""
    import onnx
    from onnx import helper

    graph = helper.make_graph([], "dualbrain_linked", [], [])
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    opsets: dict[str, int] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    prev_hidden = None
    shapes: dict[str, tuple[int | str, ...]] = {}      # linked name -> the block signature's shape
    chain = manifest.chain
    last = chain[-1]
    for block in chain:
        kind = KINDS[block.kind]
        variant = window and block.window_file is not None
        m = onnx.load(str(out_dir / block.graph(variant)[0]), load_external_data=False)
        keep = {name: name for name in MODEL_INPUTS}
        if kind.takes is not None:
            keep[kind.takes] = prev_hidden
        if block is last:              # the model's output keeps its name
            keep[kind.gives] = kind.gives
        for s in block.state:
            keep[s.input] = state_name(block.name, s.input)
            keep[s.output] = state_name(block.name, s.output)
            if variant and s.window_output:
                keep[s.window_output] = state_name(block.name, s.window_output)
        g = m.graph
        _rename_graph(g, block.name, keep)
        hidden_name = keep.get(kind.gives, f"{block.name}/{kind.gives}")
        if not kind.last_positions:     # (a last-positions block's "seq" is logits_to_keep, not the call's)
            for t in block.inputs + block.graph(variant)[1]:
                shapes.setdefault(keep.get(t.name, f"{block.name}/{t.name}"), t.shape)
        if kind.last_positions:
            # logits (and final hidden states) for the last `logits_to_keep` positions only
            last_hidden = f"{block.name}/_last_hidden"
            c = lambda name, v: helper.make_node(  # noqa: E731
                "Constant", [], [f"{block.name}/_{name}"],
                value=helper.make_tensor(name, onnx.TensorProto.INT64, [1], [v]))
            graph.node.extend([
                helper.make_node("Neg", [LOGITS_TO_KEEP.name], [f"{block.name}/_last_start"]),
                c("last_end", 2**62), c("last_axis", 1),
                helper.make_node("Slice", [prev_hidden, f"{block.name}/_last_start", f"{block.name}/_last_end",
                                           f"{block.name}/_last_axis"], [last_hidden]),
                helper.make_node("Identity", [last_hidden], [LAST_HIDDEN]),
            ])
            for n in g.node:
                n.input[:] = [last_hidden if x == prev_hidden else x for x in n.input]
            inputs[LOGITS_TO_KEEP.name] = helper.make_tensor_value_info(LOGITS_TO_KEEP.name, onnx.TensorProto.INT64,
                                                                       list(LOGITS_TO_KEEP.shape))
            hidden_vi = next(v for v in g.input if v.name == prev_hidden)
            graph.output.append(helper.make_tensor_value_info(
                LAST_HIDDEN, hidden_vi.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in hidden_vi.type.tensor_type.shape.dim]))
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
    _share_dims(graph, shapes)
    _share_constants(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="dualbrain")
    model.ir_version = 10
    model.functions.extend(functions.values())
    name = LINKED_WINDOW if window else LINKED
    onnx.save(model, str(out_dir / name))
    return name
