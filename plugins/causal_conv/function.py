"""ONNX FunctionProtos for ``dualbrain::CausalConv1d`` and ``dualbrain::CausalConv1dWindow``.

Body (standard ONNX ops only, dtype-polymorphic: float32 / float16 / bfloat16 wherever the EP has
kernels; no fixed-type Cast):

    w   = Unsqueeze(CastLike(weight, x), [1])          # (C, 1, K)
    xc  = Concat(CastLike(conv_state, x), Transpose(x, [0, 2, 1]), axis=2)   # (B, C, T+K-1)
    yc  = Conv(xc, w, group=@channels)                 # (B, C, T), no padding
    y   = Transpose(yc * Sigmoid(yc), [0, 2, 1])       # (B, T, C)
    new_state = Slice(xc, starts=[T], ends=[INT64_MAX], axes=[2])
    states    = Transpose(Gather(xc, (t+1+j)[T, K-1], axis=2), [0, 2, 1, 3])   # window only
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .reference import DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "onnx_functions"]

_INT64_MAX = 2**63 - 1


def _const_i64(name, vals):
    return helper.make_node(
        "Constant", [], [name],
        value=helper.make_tensor(name + "_t", TensorProto.INT64, [len(vals)], list(vals)))


def _const_i64_scalar(name, val):
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name + "_t", TensorProto.INT64, [], [val]))


def _build(opset: int, window: bool) -> onnx.FunctionProto:
    group = helper.make_attribute_ref("group", onnx.AttributeProto.INT)
    group.ref_attr_name = "channels"
    conv = helper.make_node("Conv", ["xc", "w3"], ["yc"])
    conv.attribute.append(group)
    nodes = [
        _const_i64("ax1", [1]),
        helper.make_node("CastLike", ["weight", "x"], ["w"]),
        helper.make_node("Unsqueeze", ["w", "ax1"], ["w3"]),
        helper.make_node("CastLike", ["conv_state", "x"], ["s"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["s", "xt"], ["xc"], axis=2),
        conv,
        helper.make_node("Sigmoid", ["yc"], ["sg"]),
        helper.make_node("Mul", ["yc", "sg"], ["ys"]),
        helper.make_node("Transpose", ["ys"], ["y"], perm=[0, 2, 1]),
        # new_state = xc[:, :, T:]
        helper.make_node("Shape", ["x"], ["T1"], start=1, end=2),
        _const_i64("imax", [_INT64_MAX]),
        _const_i64("ax2", [2]),
        helper.make_node("Slice", ["xc", "T1", "imax", "ax2"], ["new_state"]),
    ]
    outputs = ["y", "new_state"]
    if window:
        nodes += [
            # idx[t, j] = t + 1 + j, t < T, j < K-1
            helper.make_node("Shape", ["conv_state"], ["Km1_1"], start=2, end=3),
            _const_i64("ax0", [0]),
            helper.make_node("Squeeze", ["T1", "ax0"], ["T0"]),
            helper.make_node("Squeeze", ["Km1_1", "ax0"], ["Km1"]),
            _const_i64_scalar("zero", 0),
            _const_i64_scalar("one", 1),
            helper.make_node("Add", ["T0", "one"], ["Tp1"]),
            helper.make_node("Range", ["one", "Tp1", "one"], ["rt"]),
            helper.make_node("Range", ["zero", "Km1", "one"], ["rj"]),
            helper.make_node("Unsqueeze", ["rt", "ax1"], ["rt2"]),
            helper.make_node("Unsqueeze", ["rj", "ax0"], ["rj2"]),
            helper.make_node("Add", ["rt2", "rj2"], ["idx"]),
            helper.make_node("Gather", ["xc", "idx"], ["g"], axis=2),  # (B, C, T, K-1)
            helper.make_node("Transpose", ["g"], ["states"], perm=[0, 2, 1, 3]),
        ]
        outputs.append("states")
    return helper.make_function(
        DOMAIN,
        OP_TYPE_WINDOW if window else OP_TYPE,
        inputs=["x", "weight", "conv_state"],
        outputs=outputs,
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["channels"],
    )


def onnx_functions(opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos for CausalConv1d and CausalConv1dWindow (domain "dualbrain"); ``opset`` must
    equal the model's default-domain opset import."""
    return [_build(opset, False), _build(opset, True)]
