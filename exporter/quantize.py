"""Weight-only int4 quantization of an exported block: a post-pass over its ONNX file.

Every 2-D weight initializer that feeds the B input of a MatMul (or Gemm), directly or through a
2-D Transpose, is replaced by ``DequantizeLinear(W_int4, scale)`` with ONNX blockwise quantization
(opset 21: ``axis`` + ``block_size``, INT4 data):

* the weight is stored as ``[K, N]`` (input dimension first; a ``Transpose(perm=[1, 0])`` between
  the initializer and the MatMul is folded into the stored layout and removed), blocks run along K
  (``axis=0``): the canonical weight-only layout that ONNX Runtime and TensorRT fuse into int4 GEMMs;
* block size 128 along K, or 64 / 32 when K is not a multiple of 128 (the largest that divides K);
  a weight whose K none of them divides stays unquantized, and so does a weight that is one block
  in all (K = block, one output: TensorRT refuses its one-element scale);
* symmetric int4 (zero point 0, no zero-point input): ``scale = max|w| / 7`` per block, rounded to
  the export dtype (scales are float16 / bfloat16, as the graph computes), ``q = clip(round(w /
  scale), -8, 7)``.

Left in the export dtype: the embedding table (Gather), norms and other 1-D parameters, the causal
conv weights, and the MoE expert tensors fed to ``dualbrain::MoEDispatch`` (quantizing those needs
the plugin / ONNX function to take int4 experts; not done yet). The router and shared-expert
linears are ordinary MatMuls and are quantized.

The block's external-data file is rewritten one tensor at a time (memory stays at one weight) into
a temporary file, then both the graph and its data replace the originals.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime import dtypes
from dualbrain.runtime.dtypes import INT4_WEIGHT_ONLY, QUANT_MODES

BLOCK_SIZES = (128, 64, 32)
MIN_OPSET = 21           # DequantizeLinear-21: blockwise (block_size) and INT4
QMIN, QMAX = -8, 7
ALIGN = 64               # byte alignment of tensors in the rewritten external-data file


def block_size_for(k: int) -> int | None:
    """The largest of 128 / 64 / 32 that divides `k`, or None."""
    return next((b for b in BLOCK_SIZES if k % b == 0), None)


FLOAT_ONNX_TYPES = tuple(dtypes.dtype(n).onnx for n in dtypes.FLOAT_DTYPES)


def _np_dtype(data_type: int):
    """numpy dtype of a float ONNX element type, else None."""
    return dtypes.numpy_dtype(dtypes.from_onnx(data_type).name) if data_type in FLOAT_ONNX_TYPES else None


def quantize_int4(w: np.ndarray, block: int, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise int4 of a 2-D `w` [K, N], blocks of `block` rows along axis 0.

    Returns (q int8 [K, N] in [-8, 7], scale [K // block, N] in `scale_dtype`). The scale is rounded
    to `scale_dtype` first and q computed from the rounded scale, so q * scale is the best int4
    approximation the stored scale allows.
    """
    k, n = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    wb = np.asarray(w, dtype=np.float32).reshape(k // block, block, n)
    amax = np.abs(wb).max(axis=1)
    scale = (amax / QMAX).astype(scale_dtype)
    s32 = scale.astype(np.float32)[:, None, :]
    q = np.zeros_like(wb)
    np.divide(wb, s32, out=q, where=s32 > 0)
    q = np.clip(np.rint(q), QMIN, QMAX).astype(np.int8).reshape(k, n)
    return q, scale


def dequantize_int4(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """Reference DequantizeLinear (axis 0, `block`, zero point 0): q * scale in the scale's dtype."""
    s = np.repeat(scale.astype(np.float32), block, axis=0)
    return (q.astype(np.float32) * s).astype(scale.dtype)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 packing: two values per byte, the first in the low nibble; odd counts padded."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_int4` (sign-extended int8)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    flat = np.empty(b.size * 2, dtype=np.uint8)
    flat[0::2], flat[1::2] = b & 0x0F, b >> 4
    v = flat[: int(np.prod(shape))].astype(np.int8)
    v[v > 7] -= 16
    return v.reshape(shape)


@dataclass
class _Plan:
    """One weight to quantize."""
    name: str              # the initializer
    out: str               # the value DequantizeLinear produces (the weight's or the Transpose's name)
    transpose: bool        # stored [N, K] behind a Transpose: store [K, N] and drop the Transpose
    drop: object | None    # the Transpose node to remove
    block: int


def _consumers(graph) -> dict[str, list[tuple[object, int]]]:
    """value name -> [(node, input index)] in `graph`; names used inside subgraphs count as (node, -1)."""
    cons: dict[str, list] = {}

    def sub_names(g, acc):
        for n in g.node:
            acc.update(n.input)
            for a in n.attribute:
                for s in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    sub_names(s, acc)

    for node in graph.node:
        for i, x in enumerate(node.input):
            cons.setdefault(x, []).append((node, i))
        for a in node.attribute:
            for s in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used: set[str] = set()
                sub_names(s, used)
                for x in used:
                    cons.setdefault(x, []).append((node, -1))
    return cons


def _is_weight_input(node, idx: int, k_axis_first: bool) -> bool:
    """`node` consumes a [K, N] weight (k_axis_first) or an [N, K] one at input `idx`."""
    if node.domain not in ("", "ai.onnx") or idx != 1:
        return False
    if node.op_type == "MatMul":
        return k_axis_first
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs.get("transB", 0) == (0 if k_axis_first else 1) and attrs.get("transA", 0) in (0, 1)
    return False


def plan_weights(model) -> tuple[list[_Plan], list[tuple[str, str]]]:
    """(weights to quantize, [(initializer, why it stays)] for 2-D float MatMul weights left as they are)."""
    graph = model.graph
    cons = _consumers(graph)
    outputs = {o.name for o in graph.output}
    floats = FLOAT_ONNX_TYPES
    plans, skipped = [], []
    for t in graph.initializer:
        if len(t.dims) != 2 or t.data_type not in floats or t.name in outputs:
            continue
        users = cons.get(t.name, [])
        if len(users) != 1:
            continue
        node, idx = users[0]
        if _is_weight_input(node, idx, True):
            k, out, transpose, drop = t.dims[0], t.name, False, None
        elif node.domain in ("", "ai.onnx") and node.op_type == "Transpose" and idx == 0:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            tout = node.output[0]
            tusers = cons.get(tout, [])
            if perm != [1, 0] or tout in outputs or not tusers \
                    or not all(_is_weight_input(n, i, True) for n, i in tusers):
                continue
            k, out, transpose, drop = t.dims[1], tout, True, node
        elif _is_weight_input(node, idx, False):       # Gemm transB=1: [N, K]
            k, out, transpose, drop = t.dims[1], t.name, True, None
            # stored transposed to [K, N]: the Gemm must then read it untransposed
        else:
            continue
        block = block_size_for(int(k))
        if block is None:
            skipped.append((t.name, f"input dimension {k} is not a multiple of 32"))
            continue
        if k == block and t.dims[0] * t.dims[1] == k:
            # one block in all (a tiny model's [H, 1] shared-expert gate): TensorRT refuses a
            # blockwise DequantizeLinear whose scale has one element ("ScaleMode is illegal")
            skipped.append((t.name, f"a single {k} x 1 block"))
            continue
        plans.append(_Plan(t.name, out, transpose, drop, block))
    return plans, skipped


def _read(data, t, fallback_dtype) -> np.ndarray:
    """The float array of initializer `t` from the open external-data file `data` (or inline)."""
    from onnx import numpy_helper

    dt = _np_dtype(t.data_type) or fallback_dtype
    ext = {e.key: e.value for e in t.external_data}
    if t.data_location == t.EXTERNAL:
        data.seek(int(ext.get("offset", 0)))
        raw = data.read(int(ext["length"]))
        return np.frombuffer(raw, dtype=dt).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def quantize_block(path: str | os.PathLike, mode: str = INT4_WEIGHT_ONLY) -> dict:
    """Quantize the linear weights of the block graph at `path` in place (graph and its external
    data); returns {"quantized": {name: block}, "skipped": {name: reason}}."""
    import onnx
    from onnx import TensorProto, helper

    if mode != INT4_WEIGHT_ONLY:
        raise DualbrainError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise DualbrainError(f"{path.name}: int4 blockwise DequantizeLinear needs default-domain opset "
                             f">= {MIN_OPSET}, the graph has {opset}")
    if model.ir_version < 10:
        model.ir_version = 10   # INT4 needs IR 10
    graph = model.graph
    plans, skipped = plan_weights(model)
    by_name = {p.name: p for p in plans}
    data_name = None
    for t in graph.initializer:
        if t.data_location == t.EXTERNAL:
            loc = next(e.value for e in t.external_data if e.key == "location")
            if data_name not in (None, loc):
                raise DualbrainError(f"{path.name}: initializers in more than one external-data file")
            data_name = loc
    if not plans:
        return {"quantized": {}, "skipped": dict(skipped)}
    if data_name is None:
        data_name = path.name + ".data"
    data_path = path.parent / data_name
    tmp_data = data_path.with_name(data_path.name + ".quant-tmp")
    tmp_graph = path.with_name(path.name + ".quant-tmp")

    new_inits: list = []
    new_nodes: dict[int, object] = {}    # id(Transpose node) -> its DequantizeLinear replacement
    first_nodes: list = []               # DequantizeLinear of weights fed straight to MatMul/Gemm
    src = open(data_path, "rb") if data_path.is_file() else None
    try:
        with open(tmp_data, "wb") as dst:
            def put(t, raw: bytes) -> None:
                pad = (-dst.tell()) % ALIGN
                if pad:
                    dst.write(b"\0" * pad)
                offset = dst.tell()
                dst.write(raw)
                del t.external_data[:]
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                t.ClearField("raw_data")

            for t in graph.initializer:
                p = by_name.get(t.name)
                if p is None:
                    if t.data_location == t.EXTERNAL:
                        ext = {e.key: e.value for e in t.external_data}
                        src.seek(int(ext.get("offset", 0)))
                        put(t, src.read(int(ext["length"])))
                    new_inits.append(t)
                    continue
                w = _read(src, t, None)
                sdt = w.dtype
                if p.transpose:
                    w = w.T
                q, scale = quantize_int4(w, p.block, sdt)
                del w
                qt = onnx.TensorProto(name=f"{t.name}.int4", data_type=TensorProto.INT4, dims=list(q.shape))
                put(qt, pack_int4(q))
                st = onnx.TensorProto(name=f"{t.name}.scale", data_type=t.data_type, dims=list(scale.shape))
                put(st, np.ascontiguousarray(scale).tobytes())
                del q, scale
                new_inits += [qt, st]
                dq = helper.make_node("DequantizeLinear", [qt.name, st.name], [p.out], name=f"{t.name}.dequantize",
                                      axis=0, block_size=p.block)
                if p.drop is not None:
                    new_nodes[id(p.drop)] = dq
                else:
                    first_nodes.append(dq)
                    if p.transpose:       # Gemm transB=1 reading the now [K, N] weight
                        (node, _), = _consumers(graph)[t.name]
                        for a in node.attribute:
                            if a.name == "transB":
                                a.i = 0
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        tmp_data.unlink(missing_ok=True)
        raise
    finally:
        if src is not None:
            src.close()

    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    gone = {p.name for p in plans if p.out != p.name}
    for field in (graph.value_info, graph.input):
        keep = [v for v in field if v.name not in gone]
        del field[:]
        field.extend(keep)
    nodes = first_nodes + [new_nodes.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    # value_info of a removed Transpose output stays valid: DequantizeLinear produces the same value
    try:
        onnx.save(model, str(tmp_graph))
        os.replace(tmp_data, data_path)
        os.replace(tmp_graph, path)
    except BaseException:
        tmp_data.unlink(missing_ok=True)
        tmp_graph.unlink(missing_ok=True)
        raise
    return {"quantized": {p.name: p.block for p in plans}, "skipped": dict(skipped)}
