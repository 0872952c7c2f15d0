"""ONNX Runtime's fused kernels for a quantized export, chosen at load (the export keeps the portable form).

`exporter.quantize` writes every quantized weight as a blockwise DequantizeLinear. ONNX Runtime
fuses the linears' DequantizeLinear -> MatMul into MatMulNBits by itself (int8 activations:
``session.qdq_matmulnbits_accuracy_level``, 4 by default). It has no such fusion for the other two
roles, which this module rewrites in the graph handed to the session:

* ``dualbrain::MoEDispatch(x, logits, DQ(fc1), DQ(fc2))`` -> ``com.microsoft.QMoE`` (SwiGLU,
  interleaved gate/up, the node's top_k and normalisation, accuracy level 4), so the experts are
  read quantized instead of dequantized to float every step;
* ``Gather(DQ(table), ids)`` -> ``com.microsoft.GatherBlockQuantized``, so the embedding lookup
  reads its rows quantized instead of dequantizing the whole table each call.

Before both, ``widen_scales`` turns a float32 export's float16 scales (``DQ -> Cast``) into float32 ones.

Both kernels read unsigned values with the implicit mid zero point (8 / 128), which is the layout
the exporter stores these roles in: the rewritten tensors point at the same bytes of the export's
external data (packed UINT4 read as uint8), so nothing is copied or loaded twice. The zero point is
the exporter's nodes making it (or an earlier export's stored tensor): dropped with the
DequantizeLinear. A pattern that does not match exactly is left as it is: ONNX Runtime then runs the
DequantizeLinear itself, slower, with the same result.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dualbrain.plugins.moe_dispatch.reference import DOMAIN as MOE_DOMAIN, OP_TYPE as MOE_OP

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4          # int8 activations in the int4/int8 GEMMs (llama.cpp's Q4_0/Q8_0 do the same)
# QMoE's activation for our experts: plain SwiGLU, silu(gate) * up, on interleaved gate/up rows
QMOE_SWIGLU = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
_UNSIGNED_BITS = {TensorProto.UINT4: 4, TensorProto.UINT8: 8}
_ONNX = ("", "ai.onnx")     # the default domain, as nodes spell it
# a Constant node's value attributes other than `value` (a tensor) -> the numpy dtype they hold
_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Quantized(NamedTuple):
    """An unsigned blockwise DequantizeLinear with the mid zero point, as a fused kernel reads it."""
    dq: object                  # the node
    q: object                   # its values (an initializer)
    scale: str
    bits: int
    block: int
    zero_point_nodes: list      # the nodes making its zero point ([] for a stored one)


class _Graph:
    def __init__(self, graph, model_dir):
        self.graph = graph
        self.model_dir = model_dir
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.users: dict[str, int] = {}
        self.readers: dict[str, list] = {}   # value -> the nodes reading it, in graph order (each once)
        for n in graph.node:
            for x in n.input:
                self.users[x] = self.users.get(x, 0) + 1
            for x in dict.fromkeys(n.input):
                self.readers.setdefault(x, []).append(n)
        self.outputs = {o.name for o in graph.output}
        typed = list(graph.value_info) + list(graph.input) + list(graph.output)
        self.shapes = {v.name: v.type.tensor_type.shape for v in typed}      # where the graph records them
        self.types = {v.name: v.type.tensor_type.elem_type for v in typed}
        self.drop_nodes: set[int] = set()
        self.drop_inits: set[str] = set()
        self.add_inits: list = []

    def only_user(self, value: str):
        """The one node that reads `value` when exactly one does and it is not a graph output; else None."""
        if self.users.get(value) != 1 or value in self.outputs:
            return None
        return self.readers[value][0]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is an inline initializer or a Constant node's; else None."""
        t = self.inits.get(name)
        if t is None:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or node.domain not in _ONNX:
                return None
            attrs = _attrs(node)
            if len(attrs) != 1:
                return None
            (key, value), = attrs.items()
            if key != "value":
                return np.asarray(value, _CONSTANT_LISTS[key]) if key in _CONSTANT_LISTS else None
            t = value
        return None if t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)

    def scalar(self, name: str) -> float | None:
        """The value of a one-element float constant `name`; else None."""
        value = self.constant(name)
        if value is None or value.dtype != np.float32 or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def dequantized(self, value: str, rank: int, axis: int) -> _Quantized | None:
        """The DequantizeLinear giving `value` when `value` is its only use and it is unsigned and blockwise, of
        a rank-`rank` initializer along `axis`, with the mid zero point (`mid_zero_point`); else None."""
        dq = self.producer.get(value)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in _ONNX \
                or len(dq.input) != 3 or self.users.get(value, 0) != 1:
            return None
        q, scale = self.inits.get(dq.input[0]), self.inits.get(dq.input[1])
        a = _attrs(dq)
        if q is None or scale is None or q.data_type not in _UNSIGNED_BITS or len(q.dims) != rank \
                or a.get("axis") != axis or not a.get("block_size"):
            return None
        made = self.mid_zero_point(dq.input[2], q.data_type, list(scale.dims))
        if made is None:
            return None
        return _Quantized(dq, q, scale.name, _UNSIGNED_BITS[q.data_type], int(a["block_size"]), made)

    def mid_zero_point(self, name: str, data_type: int, dims: list[int]) -> list | None:
        """When value `name` is the fused kernels' implicit zero point, 2^(bits-1) everywhere, of type `data_type`
        and shape `dims`: the nodes making it as the exporter does (`exporter.quantize.Encoding.zero_point_nodes`:
        [Cast of] a ConstantOfShape of a constant shape), or [] for an earlier export's stored tensor; else None."""
        bits = _UNSIGNED_BITS[data_type]
        t = self.inits.get(name)
        if t is not None:
            ok = t.data_type == data_type and list(t.dims) == dims and _is_mid_zero_point(self.raw(t), dims, bits)
            return [] if ok else None
        made, node = [], self.producer.get(name)
        if node is not None and node.op_type == "Cast" and node.domain in _ONNX and _attrs(node).get("to") == data_type:
            made, node = [node], self.producer.get(node.input[0])
        if node is None or node.op_type != "ConstantOfShape" or node.domain not in _ONNX:
            return None
        value, shape = _attrs(node).get("value"), self.constant(node.input[0])
        if value is None or shape is None or shape.tolist() != dims:
            return None
        value = numpy_helper.to_array(value)
        if value.dtype != np.uint8 or value.reshape(-1).tolist() != [2 ** (bits - 1)] \
                or (not made and data_type != TensorProto.UINT8):
            return None
        return made + [node]

    def raw(self, t) -> bytes:
        """The bytes of initializer `t` (inline, or read from its external-data file)."""
        if t.data_location != TensorProto.EXTERNAL:
            return t.raw_data
        from dualbrain.runtime.manifest import safe_child

        ext = {e.key: e.value for e in t.external_data}
        with open(safe_child(self.model_dir, ext["location"], f"external data of {t.name!r}"), "rb") as f:
            f.seek(int(ext.get("offset", 0)))
            return f.read(int(ext["length"])) if "length" in ext else f.read()

    def array(self, name: str) -> np.ndarray:
        """Initializer `name` as an array (its bytes read through `raw`, external data included)."""
        t = self.inits[name]
        if t.data_location != TensorProto.EXTERNAL and not t.raw_data:
            return numpy_helper.to_array(t)          # stored in the typed fields, not as bytes
        return np.frombuffer(self.raw(t), helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))

    def as_uint8(self, q, bits: int):
        """A uint8 [.., K * bits / 8] initializer over `q`'s bytes (UINT4 packs two values per byte)."""
        dims = list(q.dims)
        dims[-1] = dims[-1] * bits // 8
        t = TensorProto(name=f"{q.name}.packed", data_type=TensorProto.UINT8, dims=dims)
        if q.data_location == TensorProto.EXTERNAL:
            t.data_location = TensorProto.EXTERNAL
            t.external_data.extend(q.external_data)
        else:
            t.raw_data = q.raw_data
        self.add_inits.append(t)
        return t.name

    def drop_dq(self, quantized: _Quantized) -> None:
        """Remove `quantized`'s DequantizeLinear, its values and its zero point (stored, or the nodes making it);
        the fused node reads the scales and the bytes, and the zero point as its implicit one."""
        dq = quantized.dq
        self.drop_nodes.add(id(dq))
        for x in (dq.input[0], dq.input[2]):
            if self.users.get(x, 0) == 1:
                self.drop_inits.add(x)
        if self.users.get(dq.input[2], 0) == 1:
            for node in quantized.zero_point_nodes:
                self.drop_nodes.add(id(node))
                self.drop_inits.update(x for x in node.input if self.users.get(x, 0) == 1 and x in self.inits)

    def commit(self, replace: dict[int, object]) -> None:
        g = self.graph
        nodes = [replace.get(id(n), n) for n in g.node if id(n) not in self.drop_nodes]
        del g.node[:]
        g.node.extend(nodes)
        keep = [t for t in g.initializer if t.name not in self.drop_inits] + self.add_inits
        del g.initializer[:]
        g.initializer.extend(keep)


def _is_mid_zero_point(raw: bytes, dims: list[int], bits: int) -> bool:
    """The zero-point tensor holds 2^(bits-1) everywhere."""
    import numpy as np

    mid = 2 ** (bits - 1)
    want = (mid | (mid << 4)) if bits == 4 else mid
    arr = np.frombuffer(raw, np.uint8)
    n = int(np.prod(dims))
    if bits == 4 and n % 2:          # the padding nibble of an odd count is 0
        return arr.size > 0 and bool(np.all(arr[:-1] == want) and arr[-1] & 0x0F == mid)
    return arr.size > 0 and bool(np.all(arr == want))


def widen_scales(model, model_dir) -> int:
    """``Cast(DequantizeLinear(q, float16 scale), to=float32)`` -> ``DequantizeLinear(q, float32 scale)``:
    the scales a float32 export stores in float16 (`exporter.quantize.stored_scale_dtype`) widened once
    at load, so every rewrite after this one (and ONNX Runtime's own DequantizeLinear -> MatMulNBits
    fusion, which mistypes a float16 scale under a float32 MatMul) sees the float32 form; the product is
    the same, q * scale in float32. Returns how many were widened."""
    g = _Graph(model.graph, model_dir)
    for cast in model.graph.node:
        if cast.op_type != "Cast" or cast.domain not in _ONNX or _attrs(cast).get("to") != TensorProto.FLOAT:
            continue
        dq = g.producer.get(cast.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in _ONNX or len(dq.input) < 2 \
                or g.only_user(cast.input[0]) is not cast:
            continue
        scale = g.inits.get(dq.input[1])
        if scale is None or scale.data_type != TensorProto.FLOAT16 or g.users.get(scale.name) != 1:
            continue
        g.drop_inits.add(scale.name)
        g.add_inits.append(numpy_helper.from_array(g.array(scale.name).astype(np.float32), scale.name))
        dq.output[0] = cast.output[0]          # with float32 scales the DequantizeLinear gives the Cast's value
        g.drop_nodes.add(id(cast))
    if g.drop_nodes:
        g.commit({})
    return len(g.drop_nodes)


def fuse_quantized(model, model_dir) -> int:
    """Rewrite the quantized experts to QMoE and quantized embedding lookups to GatherBlockQuantized
    (`model_dir`: where its external data lives); returns how many nodes were rewritten."""
    g = _Graph(model.graph, model_dir)
    replace: dict[int, object] = {}
    for node in model.graph.node:
        if node.domain == MOE_DOMAIN and node.op_type == MOE_OP and len(node.input) == 4:
            fc1, fc2 = g.dequantized(node.input[2], 3, 2), g.dequantized(node.input[3], 3, 2)
            if fc1 is None or fc2 is None or (fc1.bits, fc1.block) != (fc2.bits, fc2.block):
                continue
            a = _attrs(node)
            qmoe = helper.make_node(
                "QMoE", [node.input[0], node.input[1], g.as_uint8(fc1.q, fc1.bits), fc1.scale, "",
                         g.as_uint8(fc2.q, fc2.bits), fc2.scale], list(node.output), name=f"{node.name}/qmoe",
                domain=MS_DOMAIN, k=int(a["top_k"]), normalize_routing_weights=int(a.get("normalize", 1)),
                **QMOE_SWIGLU, expert_weight_bits=fc1.bits, block_size=fc1.block, accuracy_level=ACCURACY_LEVEL)
            g.drop_dq(fc1)
            g.drop_dq(fc2)
            replace[id(node)] = qmoe
        elif node.domain in _ONNX and node.op_type == "Gather" and _attrs(node).get("axis", 0) == 0:
            table = g.dequantized(node.input[0], 2, 1)
            if table is None:
                continue
            replace[id(node)] = helper.make_node(
                "GatherBlockQuantized", [g.as_uint8(table.q, table.bits), node.input[1], table.scale],
                list(node.output), name=f"{node.name}/gather_block_quantized", domain=MS_DOMAIN, bits=table.bits,
                block_size=table.block, quantize_axis=1, gather_axis=0)
            g.drop_dq(table)
    if replace:
        g.commit(replace)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replace)
