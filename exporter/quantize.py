"""Blockwise int8 / int4 quantization of an exported block: a post-pass over its ONNX file.

A weight is replaced by ``DequantizeLinear(W_q, scale[, zero_point])`` with ONNX blockwise
quantization (opset 21: ``axis`` + ``block_size``), symmetric (``scale = max|w| / (2^(bits-1)-1)``
per block, searched a little below that and, in the ONNX Runtime modes, with the largest |w| on the
grid's longer end too for the experts, a negative scale where that weight is positive;
``q = clip(round(w / scale))``). Scales are stored in the
export dtype, except over float32: float16, as llama.cpp's Q8_0 / Q4_0 store theirs, where float16
holds them (``QuantMode.scale_dtype``, ``stored_scale_dtype``); a ``Cast`` then widens the
DequantizeLinear's float16 product. This is the portable form kept on disk; ONNX Runtime widens the
scales and fuses or rewrites it at load (``runtime.backends.ort_quant``). Four roles, each with the
layout its fused kernel reads:

* **linears** (every mode) -- a 2-D weight feeding the B input of a MatMul (or Gemm), directly or
  through a 2-D Transpose, stored ``[K, N]`` (a Transpose is folded into the layout and removed),
  signed INT4/INT8 without zero point, blocks along K (``axis=0``): ONNX Runtime fuses it with the
  MatMul into MatMulNBits (int8 activations, accuracy level 4) and TensorRT into its int4 GEMM. The
  LM head is one of them. At ``QuantMode.linear_bits`` where a mode sets it (int4-experts: 8).
* **experts** (int8 / int4) -- the ``fc1`` [E, 2I, H] and ``fc2`` [E, H, I] inputs of
  ``dualbrain::MoEDispatch``, blocks along the last axis (one block size for both, as QMoE needs),
  stored unsigned (UINT4/UINT8) with the mid zero point (8 / 128): byte for byte what ONNX Runtime's
  QMoE reads, so its rewrite points at the same bytes. The zero point is not stored: two nodes make
  it from the scales' shape (``Encoding.zero_point_nodes``), which ONNX Runtime folds at load and its
  rewrites read as the fused kernels' implicit one. (Earlier exports stored it as a tensor, a quarter
  of the float16 scales' bytes at 4 bits; they still load.)
* **embeddings** (int8 / int4) -- the table of a Gather, blocks along the hidden axis, unsigned as
  the experts (GatherBlockQuantized's uint8 form), at ``QuantMode.embedding_bits`` (8 in both).
* **routers** (int8 / int4) -- the linear giving a MoEDispatch its logits: a linear, at
  ``QuantMode.router_bits`` (8 in both).

Block size: the mode's (or ``--block``), or the largest of 128 / 64 / 32 under it that divides K; a
weight whose K none divides stays in float, and so does a weight that is one block in all (K =
block, one output: TensorRT refuses its one-element scale). ``int4-weight-only`` (the TensorRT form)
covers the linears only: our TensorRT MoE plugin takes float experts. The MTP head is never
quantized (runtime.blocks: its kind says so). Norms, the causal conv and other small parameters stay
in float.

The block's external-data file is rewritten one tensor at a time (one expert at a time for the
experts, so memory stays at one weight) into a temporary file, then both the graph and its data
replace the originals.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.plugins.moe_dispatch.reference import DOMAIN as MOE_DOMAIN, OP_TYPE as MOE_OP
from dualbrain.runtime import dtypes
from dualbrain.runtime.dtypes import EMBEDDING, EXPERTS, INT4_WEIGHT_ONLY, LINEAR, QUANT_BLOCKS, ROUTER, quant_mode

BLOCK_SIZES = QUANT_BLOCKS
MIN_OPSET = 21           # DequantizeLinear-21: blockwise (block_size) and INT4
QMIN, QMAX = -8, 7       # int4
ALIGN = 64               # byte alignment of tensors in the rewritten external-data file


def block_size_for(k: int, largest: int = 128) -> int | None:
    """The largest of 128 / 64 / 32, at most `largest`, that divides `k`, or None."""
    return next((b for b in BLOCK_SIZES if b <= largest and k % b == 0), None)


FLOAT_ONNX_TYPES = tuple(dtypes.dtype(n).onnx for n in dtypes.FLOAT_DTYPES)


def _np_dtype(data_type: int):
    """numpy dtype of a float ONNX element type, else None."""
    return dtypes.numpy_dtype(dtypes.from_onnx(data_type).name) if data_type in FLOAT_ONNX_TYPES else None


# Scales tried per block, as fractions of max|w| / qmax: the one with the least squared error wins
# (clipping the largest weight a little buys a finer step for the rest; the int4 analogue of
# llama.cpp's scale search). 1.0 first, so a tie keeps the plain scale.
SCALE_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_blockwise(w: np.ndarray, axis: int, block: int, bits: int, scale_dtype, negative_scales: bool = False
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of `w` along `axis` in blocks of `block`.

    Returns (q int8 shaped like `w`, in [-2^(bits-1), 2^(bits-1)-1]; scale in `scale_dtype`, shaped
    like `w` with `axis` divided by `block`). The scale is rounded to `scale_dtype` first and q
    computed from the rounded scale, so q * scale is the best approximation the stored scale allows.

    `negative_scales`: the search also tries the grid's longer end, -2^(bits-1), for the block's largest
    |w| (as llama.cpp's Q4_0 does), which takes a negative scale where that weight is positive: a step
    of max|w| / 8 instead of / 7 at 4 bits, 11 % less squared error on Gaussian-like weights. The exporter
    uses it for the experts (`_Plan.negative_scales`; tests/benchmarks/RESULTS.md, "Fifteenth pass")."""
    k = w.shape[axis]
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    wm = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0)
    rest = wm.shape[1:]
    wb = wm.reshape(k // block, block, *rest)
    amax = np.abs(wb).max(axis=1)
    candidates = [amax * f / qmax(bits) for f in SCALE_SEARCH]
    if negative_scales:
        peak = np.take_along_axis(wb, np.abs(wb).argmax(axis=1)[:, None], axis=1)[:, 0]    # signed
        candidates += [peak * f / -(qmax(bits) + 1) for f in SCALE_SEARCH]
    best_err = best_scale = best_q = None
    for candidate in candidates:
        scale = candidate.astype(scale_dtype)
        s32 = scale.astype(np.float32)[:, None]
        q = np.zeros_like(wb)
        np.divide(wb, s32, out=q, where=s32 != 0)
        q = np.clip(np.rint(q), -qmax(bits) - 1, qmax(bits))
        err = np.square(q * s32 - wb).sum(axis=1)
        if best_err is None:
            best_err, best_scale, best_q = err, scale, q
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_q = np.where(better[:, None], q, best_q)
    q = best_q.astype(np.int8).reshape(k, *rest)
    return np.moveaxis(q, 0, axis), np.moveaxis(best_scale, 0, axis)


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    """Reference DequantizeLinear (`axis`, `block`, symmetric): q * scale in the scale's dtype."""
    s = np.repeat(scale.astype(np.float32), block, axis=axis)
    return (q.astype(np.float32) * s).astype(scale.dtype)


def quantize_int4(w: np.ndarray, block: int, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """int4 of a 2-D `w` [K, N] in blocks of `block` rows (axis 0)."""
    return quantize_blockwise(w, 0, block, 4, scale_dtype)


def dequantize_int4(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    return dequantize_blockwise(q, scale, 0, block)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 packing: two values per byte, the first in the low nibble; odd counts padded."""
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


@dataclass(frozen=True)
class Encoding:
    """How quantized values are stored: signed without zero point (linears), or unsigned with the
    mid zero point (experts, embeddings: the layout QMoE and GatherBlockQuantized read)."""
    bits: int
    signed: bool

    @property
    def onnx_type(self) -> int:
        from onnx import TensorProto

        return {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
                (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[self.bits, self.signed]

    @property
    def suffix(self) -> str:
        return ("int" if self.signed else "uint") + str(self.bits)

    @property
    def zero_point(self) -> int:
        return 0 if self.signed else 2 ** (self.bits - 1)

    def encode(self, q: np.ndarray) -> bytes:
        v = q if self.signed else q.astype(np.int16) + self.zero_point
        return pack_int4(v) if self.bits == 4 else v.astype(np.int8 if self.signed else np.uint8).tobytes()

    def zero_point_nodes(self, name: str, dims: list[int]) -> tuple[list, list]:
        """(nodes, initializers) giving value `name`: the unsigned zero point of scales `dims`, every element
        the mid value, made as ``Cast(ConstantOfShape(dims, uint8 mid), to=UINT4)`` (ONNX Runtime has no
        4-bit ConstantOfShape; at 8 bits the ConstantOfShape alone), so that it costs 3 int64s on disk."""
        from onnx import TensorProto, helper, numpy_helper

        shape = numpy_helper.from_array(np.asarray(dims, np.int64), f"{name}.shape")
        mid = helper.make_tensor(f"{name}.value", TensorProto.UINT8, [1], [self.zero_point])
        made = name if self.bits == 8 else f"{name}.uint8"
        nodes = [helper.make_node("ConstantOfShape", [shape.name], [made], name=f"{name}.fill", value=mid)]
        if self.bits != 8:
            nodes.append(helper.make_node("Cast", [made], [name], name=f"{name}.cast", to=self.onnx_type))
        return nodes, [shape]


@dataclass
class _Plan:
    """One weight to quantize."""
    name: str              # the initializer
    out: str               # the value DequantizeLinear produces (the weight's or the Transpose's name)
    transpose: bool        # stored [N, K] behind a Transpose: store [K, N] and drop the Transpose
    drop: object | None    # the Transpose node to remove
    block: int
    role: str = LINEAR

    @property
    def axis(self) -> int:
        return {LINEAR: 0, ROUTER: 0, EXPERTS: 2, EMBEDDING: 1}[self.role]

    def negative_scales(self, qm) -> bool:
        """Whether the scale search may pick negative scales (`quantize_blockwise`): the experts, where `qm` allows."""
        return qm.negative_scales and self.role == EXPERTS

    @property
    def signed(self) -> bool:
        """Signed without zero point (the linears), or unsigned with the mid one (QMoE's, GatherBlockQuantized's)."""
        return self.role in (LINEAR, ROUTER)


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


def _moe_blocks(graph, inits: dict, largest: int) -> dict[str, int | None]:
    """fc1 / fc2 initializer -> the block size its MoEDispatch node's experts share (None: none fits)."""
    out: dict[str, int | None] = {}
    for node in graph.node:
        if node.domain != MOE_DOMAIN or node.op_type != MOE_OP or len(node.input) < 4:
            continue
        fc1, fc2 = (inits.get(x) for x in node.input[2:4])
        if fc1 is None or fc2 is None or len(fc1.dims) != 3 or len(fc2.dims) != 3:
            continue
        k1, k2 = int(fc1.dims[2]), int(fc2.dims[2])
        block = next((b for b in BLOCK_SIZES if b <= largest and k1 % b == 0 and k2 % b == 0), None)
        out[fc1.name] = out[fc2.name] = block
    return out


def _routers(graph) -> set[str]:
    """The weights (initializers, or a Transpose's input) of the linears giving a MoEDispatch its logits."""
    producer = {o: n for n in graph.node for o in n.output}
    out = set()
    for node in graph.node:
        if node.domain != MOE_DOMAIN or node.op_type != MOE_OP or len(node.input) < 2:
            continue
        linear = producer.get(node.input[1])
        if linear is None or linear.op_type not in ("MatMul", "Gemm") or len(linear.input) < 2:
            continue
        weight = producer.get(linear.input[1])
        out.add(weight.input[0] if weight is not None and weight.op_type == "Transpose" else linear.input[1])
    return out


def plan_weights(model, largest: int = 128, experts: bool = False) -> tuple[list[_Plan], list[tuple[str, str]]]:
    """(weights to quantize, [(initializer, why it stays)] for float weights of a quantizable role
    left as they are). `largest`: the block size to use where K allows; `experts`: also the MoE
    experts and the embedding tables."""
    graph = model.graph
    cons = _consumers(graph)
    outputs = {o.name for o in graph.output}
    floats = FLOAT_ONNX_TYPES
    inits = {t.name: t for t in graph.initializer}
    moe = _moe_blocks(graph, inits, largest) if experts else {}
    routers = _routers(graph) if experts else set()
    plans, skipped = [], []
    for t in graph.initializer:
        if t.data_type not in floats or t.name in outputs:
            continue
        users = cons.get(t.name, [])
        if len(users) != 1:
            continue
        node, idx = users[0]
        if t.name in moe and node.domain == MOE_DOMAIN and idx in (2, 3):
            if moe[t.name] is None:
                skipped.append((t.name, "expert widths with no common block size of 32, 64 or 128"))
            else:
                plans.append(_Plan(t.name, t.name, False, None, moe[t.name], EXPERTS))
            continue
        if len(t.dims) != 2:
            continue
        if experts and node.domain in ("", "ai.onnx") and node.op_type == "Gather" and idx == 0 \
                and all(a.i == 0 for a in node.attribute if a.name == "axis"):
            block = block_size_for(int(t.dims[1]), largest)
            if block is None:
                skipped.append((t.name, f"hidden dimension {t.dims[1]} is not a multiple of 32"))
            else:
                plans.append(_Plan(t.name, t.name, False, None, block, EMBEDDING))
            continue
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
        block = block_size_for(int(k), largest)
        if block is None:
            skipped.append((t.name, f"input dimension {k} is not a multiple of 32"))
            continue
        if k == block and t.dims[0] * t.dims[1] == k:
            # one block in all (a tiny model's [H, 1] shared-expert gate): TensorRT refuses a
            # blockwise DequantizeLinear whose scale has one element ("ScaleMode is illegal")
            skipped.append((t.name, f"a single {k} x 1 block"))
            continue
        plans.append(_Plan(t.name, out, transpose, drop, block, ROUTER if t.name in routers else LINEAR))
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


def _pieces(w: np.ndarray, p: _Plan) -> tuple[list[np.ndarray], int]:
    """`w` as stored, in storage order (one expert at a time for the experts), and the blocked axis of a piece."""
    if p.role == EXPERTS:
        return [w[e] for e in range(w.shape[0])], p.axis - 1
    return [w.T if p.transpose else w], p.axis


def _quantized_chunks(w: np.ndarray, p: _Plan, bits: int, sdt, negative_scales: bool):
    """(q, scale) pieces of `w` in storage order: one expert at a time for the experts."""
    pieces, axis = _pieces(w, p)
    for piece in pieces:
        yield quantize_blockwise(piece, axis, p.block, bits, sdt, negative_scales)


# A float32 export stores its scales in float16 (`QuantMode.scale_dtype`): half a bit a weight less at
# blocks of 32 (int4: 5 -> 4.5 bits, Q4_0's). The portable form's DequantizeLinear gives the float16
# product to a Cast; ONNX Runtime's loader widens the scales instead (`ort_quant.widen_scales`), so
# q * scale is computed in float32 and the only loss is the scale's rounding to 11 bits.
_HALF_MIN, _HALF_MAX = 2.0 ** -14, 65504.0      # float16's normal range


def stored_scale_dtype(w: np.ndarray, p: _Plan, qm, bits: int) -> np.dtype:
    """`qm`'s scale dtype over `w`'s dtype; float16 only where every scale the search can pick is a normal
    float16, else `w`'s dtype (scales that small or large would lose bits or overflow)."""
    if qm.scale_dtype(w.dtype.name) == w.dtype.name:
        return w.dtype
    pieces, axis = _pieces(w, p)
    lo, hi = np.inf, 0.0
    for piece in pieces:
        moved = np.moveaxis(piece, axis, -1)
        amax = np.abs(moved.reshape(*moved.shape[:-1], -1, p.block)).max(-1)
        nonzero = amax[amax > 0]
        if nonzero.size:
            lo, hi = min(lo, float(nonzero.min())), max(hi, float(nonzero.max()))
    q = qmax(bits)      # the smallest |scale| divides by q + 1 (`negative_scales`' end), the largest by q
    fits = lo * min(SCALE_SEARCH) / (q + 1) >= _HALF_MIN and hi * max(SCALE_SEARCH) / q <= _HALF_MAX
    return np.dtype(np.float16) if fits else w.dtype


def quantize_block(path: str | os.PathLike, mode: str = INT4_WEIGHT_ONLY, block: int | None = None) -> dict:
    """Quantize the block graph at `path` in place (graph and its external data) in `mode`, blocks of
    at most `block` (default: the mode's); returns {"quantized": {name: block}, "skipped": {name: reason}}."""
    import onnx
    from onnx import helper

    qm = quant_mode(mode)
    largest = block or qm.block
    if largest not in BLOCK_SIZES:
        raise DualbrainError(f"block size {largest} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise DualbrainError(f"{path.name}: int4 blockwise DequantizeLinear needs default-domain opset "
                             f">= {MIN_OPSET}, the graph has {opset}")
    if model.ir_version < 10:
        model.ir_version = 10   # INT4 needs IR 10
    graph = model.graph
    plans, skipped = plan_weights(model, largest, qm.experts)
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
    new_nodes: dict[int, list] = {}      # id(Transpose node) -> its DequantizeLinear (and Cast) replacement
    first_nodes: list = []               # DequantizeLinear of weights fed straight to their consumer
    src = open(data_path, "rb") if data_path.is_file() else None
    try:
        with open(tmp_data, "wb") as dst:
            def put(t, *pieces: bytes) -> None:
                pad = (-dst.tell()) % ALIGN
                if pad:
                    dst.write(b"\0" * pad)
                offset = dst.tell()
                for raw in pieces:
                    dst.write(raw)
                _point(t, data_name, offset, dst.tell() - offset)

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
                bits = qm.role_bits(p.role)
                sdt = stored_scale_dtype(w, p, qm, bits)
                enc = Encoding(bits, signed=p.signed)
                dims = list(w.shape[::-1] if p.transpose else w.shape)
                sdims = list(dims)
                sdims[p.axis] //= p.block
                qt = onnx.TensorProto(name=f"{t.name}.{enc.suffix}", data_type=enc.onnx_type, dims=dims)
                st = onnx.TensorProto(name=f"{t.name}.scale", data_type=dtypes.dtype(sdt.name).onnx, dims=sdims)
                scales = []
                # the quantized values go out piece by piece; the scales (1/block of the size) after them
                pad = (-dst.tell()) % ALIGN
                dst.write(b"\0" * pad)
                offset = dst.tell()
                for q, scale in _quantized_chunks(w, p, bits, sdt, p.negative_scales(qm)):
                    dst.write(enc.encode(q))
                    scales.append(np.ascontiguousarray(scale).tobytes())
                    del q
                del w
                _point(qt, data_name, offset, dst.tell() - offset)
                put(st, *scales)
                new_inits += [qt, st]
                ins, dq = [qt.name, st.name], []      # dq: the nodes replacing the weight, in order
                if not enc.signed:
                    zero_point = f"{t.name}.zero_point"
                    dq, zp_inits = enc.zero_point_nodes(zero_point, sdims)
                    new_inits += zp_inits
                    ins.append(zero_point)
                widen = st.data_type != t.data_type      # float16 scales of a float32 weight
                dq.append(helper.make_node("DequantizeLinear", ins, [f"{p.out}.{sdt.name}" if widen else p.out],
                                           name=f"{t.name}.dequantize", axis=p.axis, block_size=p.block))
                if widen:
                    dq.append(helper.make_node("Cast", dq[-1].output, [p.out], name=f"{t.name}.widen", to=t.data_type))
                if p.drop is not None:
                    new_nodes[id(p.drop)] = dq
                else:
                    first_nodes += dq
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
    nodes = first_nodes + [m for n in graph.node for m in new_nodes.get(id(n), [n])]
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


def _point(t, location: str, offset: int, length: int) -> None:
    """Make `t` read `length` bytes at `offset` of the external-data file `location`."""
    del t.external_data[:]
    t.data_location = t.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.ClearField("raw_data")
