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
# Weight-only quantization on top of a float dtype (`export --quant`, manifest `quant`).
INT4_WEIGHT_ONLY = "int4-weight-only"
QUANT_MODES = (INT4_WEIGHT_ONLY,)
QUANT_BASE_DTYPES = ("float16", "bfloat16")   # float dtypes a quantized export can have (scales, activations)


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
