"""Fusions ONNX Runtime's optimizer misses on our exports, made in the graph handed to the session at
load (the export keeps the portable form TensorRT builds from).

* RMSNorm and l2norm. The exporter traces `x * rsqrt(mean(x^2) + eps)` (`exporter.blocks.norms`), which
  reaches ONNX as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul (the GDN's q/k l2norm: Mul, ReduceSum,
  ...). ONNX Runtime fuses such a chain into `SimplifiedLayerNormalization` only when it ends in a Div,
  so on the mid-size MoE 58 chains of 6-7 nodes stayed in a decode step of ~1160 nodes, each node
  costing ~1.6 us of launch overhead on top of its work. Each chain, with the weight's Mul after it
  when that is a per-channel constant, becomes one SimplifiedLayerNormalization (float32 statistics,
  as the exporter computes them).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dualbrain.runtime.backends.ort_quant import _ONNX, _attrs, _Graph


class _Chain(_Graph):
    """The main graph seen as chains: ort_quant's view of it (values' readers included)."""

    def __init__(self, model):
        super().__init__(model.graph, None)

    def last_dim(self, name: str) -> int | None:
        """`name`'s last dimension where the graph records it as a number."""
        shape = self.shapes.get(name)
        last = shape.dim[-1] if shape is not None and shape.dim else None
        return last.dim_value if last is not None and last.HasField("dim_value") else None

    def channel_constant(self, name: str) -> bool:
        """`name` is a 1-D float constant, or one plus / minus a one-element one (Qwen3.5's `1 + w`)."""
        def vector(i):
            t = self.inits.get(i)     # a weight may live in external data: its dims are enough
            if t is not None:
                return t.data_type == TensorProto.FLOAT and len(t.dims) == 1 and t.dims[0] > 1
            v = self.constant(i)
            return v is not None and v.dtype == np.float32 and v.ndim == 1 and v.size > 1

        if vector(name):
            return True
        node = self.producer.get(name)
        return node is not None and node.domain in _ONNX and node.op_type in ("Add", "Sub") and len(node.input) == 2 \
            and any(vector(a) and self.scalar(b) is not None for a, b in (node.input, node.input[::-1]))


def _reduces_last_axis(g: _Chain, node) -> bool:
    a = _attrs(node)
    if a.get("keepdims", 1) != 1:
        return False
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) == 2 and g.constant(node.input[1]) is not None:
        axes = g.constant(node.input[1]).reshape(-1).tolist()
    else:
        return False
    return axes == [-1]


# the statistic's reduction -> whether it sums (the GDN's q/k l2norm) rather than averages (RMSNorm)
_SUMS = {"ReduceMean": False, "ReduceSum": True}


def fuse_rms_norm(model) -> int:
    """x * Reciprocal(Sqrt(Reduce(x^2, -1) + eps)) [* w] -> one SimplifiedLayerNormalization, in `model`'s
    main graph, where x is float32 and every intermediate value has that one reader; returns how many
    chains were fused. x^2 is Pow(x, 2) or Mul(x, x). Reduce is ReduceMean (RMSNorm: the weight's Mul
    after it joins when it is a per-channel constant) or ReduceSum (l2norm: x / sqrt(sum + eps) =
    x / sqrt(D) / sqrt(mean + eps / D), so the scale is 1 / sqrt(D) and the epsilon eps / D)."""
    g = _Chain(model)
    replace: dict[int, object] = {}
    for square in model.graph.node:
        x = _squared(g, square)
        if x is None or g.types.get(x, TensorProto.FLOAT) != TensorProto.FLOAT:
            continue
        reduce = g.only_user(square.output[0])
        add = reduce and reduce.op_type in _SUMS and _reduces_last_axis(g, reduce) and g.only_user(reduce.output[0])
        if not add or add.op_type != "Add" or add.input[0] != reduce.output[0]:
            continue
        eps = g.scalar(add.input[1])
        sqrt = eps is not None and g.only_user(add.output[0])
        recip = sqrt and sqrt.op_type == "Sqrt" and g.only_user(sqrt.output[0])
        norm = recip and recip.op_type == "Reciprocal" and g.only_user(recip.output[0])
        if not norm or norm.op_type != "Mul" or sorted(norm.input) != sorted([x, recip.output[0]]):
            continue
        chain, scale, out = [square, reduce, add, sqrt, recip, norm], None, norm.output[0]
        sums = _SUMS[reduce.op_type]
        weight = None if sums else g.only_user(norm.output[0])
        if weight is not None and weight.op_type == "Mul" and weight.domain in _ONNX:
            other = [i for i in weight.input if i != norm.output[0]]
            if len(other) == 1 and g.channel_constant(other[0]):
                chain, scale, out = chain + [weight], other[0], weight.output[0]
        name = f"{norm.name or out}/rms_norm"
        if scale is None:
            dim = g.last_dim(x)
            if not dim:
                continue
            scale = f"{name}/scale"
            g.add_inits.append(numpy_helper.from_array(np.full(dim, dim ** -0.5 if sums else 1.0, np.float32), scale))
            eps = eps / dim if sums else eps
        # in the last node's place: x and the scale are both computed by then
        for n in chain[:-1]:
            g.drop_nodes.add(id(n))
        replace[id(chain[-1])] = helper.make_node("SimplifiedLayerNormalization", [x, scale], [out], name=name,
                                                  axis=-1, epsilon=eps, stash_type=1)
    if replace:
        g.commit(replace)
    return len(replace)


def _squared(g: _Chain, node) -> str | None:
    """x when `node` is Pow(x, 2) or Mul(x, x); else None."""
    if node.domain not in _ONNX:
        return None
    if node.op_type == "Pow" and g.scalar(node.input[1]) == 2.0:
        return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    return None
