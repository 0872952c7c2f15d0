"""The one dtype table: every element type dualbrain reads or writes, under every framework's name.

Manifests and engine manifests name dtypes the numpy way (`float32`, `bfloat16`, `int64`); the
checkpoint reader, the exporter, the quantizer, the backends and the TensorRT plugins translate
through this table. Framework types are looked up lazily (`getattr` on the module the caller
passes or imports here on demand), so reading the table imports neither torch nor TensorRT.
"""
from __future__ import annotations

from dataclasses import dataclass

from dualbrain.errors import DualbrainError


@dataclass(frozen=True)
class DType:
    name: str                  # numpy-style, as manifests write it
    itemsize: int
    safetensors: str | None    # safetensors header name (F32, BF16, ...)
    onnx: int | None           # onnx.TensorProto.DataType value
    torch: str | None          # attribute of the torch module
    trt: str | None            # attribute of tensorrt(_rtx).DataType
    numpy: str | None          # numpy (or ml_dtypes) type name


# onnx.TensorProto values are part of the ONNX spec, so they are written out rather than imported.
TABLE: tuple[DType, ...] = (
    DType("float32", 4, "F32", 1, "float32", "FLOAT", "float32"),
    DType("float16", 2, "F16", 10, "float16", "HALF", "float16"),
    DType("bfloat16", 2, "BF16", 16, "bfloat16", "BF16", "bfloat16"),
    DType("float64", 8, "F64", 11, "float64", None, "float64"),
    DType("int64", 8, "I64", 7, "int64", "INT64", "int64"),
    DType("int32", 4, "I32", 6, "int32", "INT32", "int32"),
    DType("int16", 2, "I16", 5, "int16", None, "int16"),
    DType("int8", 1, "I8", 3, "int8", "INT8", "int8"),
    DType("uint8", 1, "U8", 2, "uint8", "UINT8", "uint8"),
    DType("bool", 1, "BOOL", 9, "bool", "BOOL", "bool_"),
    DType("float8_e4m3fn", 1, "F8_E4M3", 17, "float8_e4m3fn", "FP8", "float8_e4m3fn"),
    DType("float8_e5m2", 1, "F8_E5M2", 19, "float8_e5m2", None, "float8_e5m2"),
)
BY_NAME = {d.name: d for d in TABLE}

# Precisions a model can be exported in (`export --dtype`, `make-tiny --dtype`, manifest `dtype`).
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


# A float export dtype -> the dtype its quantization scales are stored in, where not its own
HALF_SCALES = {"float32": "float16"}
# The roles a quantized weight plays: exporter.quantize plans each weight as one, bench counts their bytes
LINEAR, EXPERTS, EMBEDDING, ROUTER = "linear", "experts", "embedding", "router"


@dataclass(frozen=True)
class QuantMode:
    """A blockwise weight quantization on top of a float export dtype (`export --quant`, manifest `quant`).

    Symmetric: q = round(w / scale), scale about max|w| / (2^(bits-1) - 1) per block of `block` input
    features (smaller blocks where the input dimension needs it). On disk every quantized weight is
    an ONNX DequantizeLinear-21 (the portable form); ONNX Runtime runs the linears as MatMulNBits
    and, at load, the experts as QMoE and the embeddings as GatherBlockQuantized."""
    name: str
    bits: int
    block: int                      # default (largest) block size
    experts: bool                   # MoE experts and embedding tables too, not only the linears
    base_dtypes: tuple[str, ...]    # float dtypes it goes on top of (scales and activations)
    tensorrt: bool                  # a TensorRT recipe can build it (our MoE plugin takes float experts)
    # The embedding table's bits (with `experts`). A lookup reads one row a token, so its bits cost size,
    # not speed; at 4 bits its rounding is the largest single loss of top-1 agreement on the trained
    # models (tests/benchmarks/RESULTS.md, "Fourteenth pass").
    embedding_bits: int = 8
    # The MoE router's bits (with `experts`): at 4 bits its rounding flips top-k choices (the trained pair:
    # 4 points of top-1 agreement); llama.cpp keeps it in float. [H, E]: a small matrix.
    router_bits: int = 8
    # The other linears' bits (None: `bits`). int4-experts keeps them at 8: on a small model their 4-bit
    # rounding is most of what int4 loses (RESULTS, "Fourteenth pass"); the experts hold most of the bytes.
    linear_bits: int | None = None
    # Whether an expert block's scale may be negative, so that its largest |w| can take the grid's longer end
    # (-8 at 4 bits: exporter.quantize.quantize_blockwise); measured to lift the experts' agreement on three
    # trained models, and to cost the pair's 4-bit dense linears (RESULTS, "Fifteenth pass"). QMoE and our
    # kernels multiply by the scale as it is; the TensorRT form (no experts) keeps positive scales.
    negative_scales: bool = True

    def role_bits(self, role: str) -> int:
        """The bits a weight of `role` (LINEAR, EXPERTS, EMBEDDING, ROUTER) is stored at in this mode."""
        by_role = {EMBEDDING: self.embedding_bits, ROUTER: self.router_bits, LINEAR: self.linear_bits}
        return by_role.get(role) or self.bits

    def scale_dtype(self, base: str) -> str:
        """The dtype scales are stored in over a `base` export: float16 over float32, as llama.cpp's Q8_0 /
        Q4_0 store theirs (the quantizer keeps `base` for a weight whose scales float16 cannot hold)."""
        return HALF_SCALES.get(base, base)


INT8, INT4, INT4_EXPERTS = "int8", "int4", "int4-experts"
# The TensorRT form: linear weights only, int4, scales in fp16/bf16; before int8/int4 it was the only one.
INT4_WEIGHT_ONLY = "int4-weight-only"
QUANTS = {q.name: q for q in (
    QuantMode(INT8, 8, 32, True, FLOAT_DTYPES, False),
    QuantMode(INT4, 4, 32, True, FLOAT_DTYPES, False),
    QuantMode(INT4_EXPERTS, 4, 32, True, FLOAT_DTYPES, False, linear_bits=8),
    QuantMode(INT4_WEIGHT_ONLY, 4, 128, False, ("float16", "bfloat16"), True, negative_scales=False),
)}
QUANT_MODES = tuple(QUANTS)
QUANT_BLOCKS = (128, 64, 32)
TENSORRT_QUANT_MODES = tuple(q.name for q in QUANTS.values() if q.tensorrt)
QUANT_BASE_DTYPES = QUANTS[INT4_WEIGHT_ONLY].base_dtypes   # what a TensorRT quantized recipe takes


def quant_mode(name: str) -> QuantMode:
    try:
        return QUANTS[name]
    except KeyError:
        raise DualbrainError(f"unknown quantization {name!r} (choose from {', '.join(QUANT_MODES)})") from None


def dtype(name: str) -> DType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise DualbrainError(f"unknown dtype {name!r}") from None


def _find(field: str, value) -> DType:
    for d in TABLE:
        if getattr(d, field) == value:
            return d
    raise DualbrainError(f"unsupported {field} dtype {value!r}")


def from_safetensors(name: str) -> DType:
    return _find("safetensors", name)


def from_onnx(code: int) -> DType:
    return _find("onnx", int(code))


def numpy_dtype(name: str):
    """The numpy dtype for `name` (bfloat16 and float8 through ml_dtypes)."""
    import numpy as np

    d = dtype(name)
    if hasattr(np, d.numpy):
        return np.dtype(getattr(np, d.numpy))
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, d.numpy))


def torch_dtype(name: str):
    import torch

    return getattr(torch, dtype(name).torch)


def from_torch(t) -> DType:
    return _find("torch", str(t).removeprefix("torch."))


def trt_dtype(trt, name: str):
    """tensorrt.DataType for `name` (`trt`: the imported TensorRT module, either flavour)."""
    d = dtype(name)
    if d.trt is None:
        raise DualbrainError(f"TensorRT has no {name} tensors")
    return getattr(trt.DataType, d.trt)


def from_trt(trt, dt) -> DType:
    for d in TABLE:
        if d.trt is not None and getattr(trt.DataType, d.trt, None) == dt:
            return d
    raise DualbrainError(f"unsupported TensorRT dtype {dt}")
