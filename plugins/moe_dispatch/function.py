"""ONNX FunctionProto for ``dualbrain::MoEDispatch`` (model-local function, for ONNX Runtime).

Signature: ``y = MoEDispatch<top_k: int, normalize: int = 1>(x, router_logits, fc1, fc2)`` with
x [N, H], router_logits [N, E], fc1 [E, 2I, H] (gate/up interleaved row by row), fc2 [E, H, I],
y [N, H]; all four tensors share one dtype (float32, float16 or bfloat16 -- the body is
type-generic, so one FunctionProto serves every dtype and every top_k).

Two bodies are available:

* ``body="contrib"`` (default): one ``com.microsoft.MoE`` node (``activation_type="swiglu"``,
  ``swiglu_fusion=1``, ``k`` <- top_k, ``normalize_routing_weights`` <- normalize, alpha 1,
  beta 0, no swiglu_limit).  ORT applies a float softmax over all E logits, takes the top-k and,
  with ``normalize_routing_weights=1``, renormalises them -- exactly Qwen3_5MoeTopKRouter; with 0
  it keeps the un-renormalised full-softmax probabilities (Qwen with norm_topk_prob=False).
  Runs on the ORT CPU EP for float32 and float16 (checked with ORT 1.32) and on the CUDA EP.
* ``body="standard"``: default-domain ops only (Softmax in float32, TopK, ScatterElements into a
  dense [N, E] weight matrix, all experts computed densely with batched MatMul).  Exact but it
  does E/top_k times the expert FLOPs: a portability fallback, not a fast path.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx import helper as oh

from .reference import DOMAIN, OP_TYPE, VERSION

__all__ = ["DOMAIN", "OP_TYPE", "VERSION", "onnx_functions", "add_functions_to_model"]

MS_DOMAIN = "com.microsoft"
_INPUTS = ["x", "router_logits", "fc1", "fc2"]
_OUTPUTS = ["y"]


def _ref_attr(name: str, ref: str, attr_type) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name = name
    a.ref_attr_name = ref
    a.type = attr_type
    return a


def _node(op, inputs, outputs, ref_attrs=(), **attrs) -> onnx.NodeProto:
    n = oh.make_node(op, inputs, outputs, **attrs)
    n.attribute.extend(ref_attrs)
    return n


def _contrib_body():
    moe = oh.make_node(
        "MoE", ["x", "router_logits", "fc1", "", "fc2"], ["y"], domain=MS_DOMAIN,
        activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    moe.attribute.extend([
        _ref_attr("k", "top_k", onnx.AttributeProto.INT),
        _ref_attr("normalize_routing_weights", "normalize", onnx.AttributeProto.INT),
    ])
    return [moe], [oh.make_opsetid(MS_DOMAIN, 1)]


def _standard_body():
    INT = onnx.AttributeProto.INT
    i64 = lambda name, vals: oh.make_node(  # noqa: E731
        "Constant", [], [name], value=oh.make_tensor(name, TensorProto.INT64, [len(vals)], vals))
    nodes = [
        # --- routing (float32, as Qwen3_5MoeTopKRouter) ---
        oh.make_node("Cast", ["router_logits"], ["logits_f"], to=TensorProto.FLOAT),
        oh.make_node("Softmax", ["logits_f"], ["probs"], axis=-1),
        _node("Constant", [], ["k_scalar"], [_ref_attr("value_int", "top_k", INT)]),
        i64("axis0", [0]),
        i64("axis_last", [-1]),
        oh.make_node("Unsqueeze", ["k_scalar", "axis0"], ["k"]),
        oh.make_node("TopK", ["probs", "k"], ["top_w", "top_i"], axis=-1, largest=1, sorted=1),
        # denom = normalize ? sum(top_w) : 1   (exact for normalize in {0, 1})
        _node("Constant", [], ["norm_i"], [_ref_attr("value_int", "normalize", INT)]),
        oh.make_node("Cast", ["norm_i"], ["norm_f"], to=TensorProto.FLOAT),
        oh.make_node("Constant", [], ["one_f"], value=oh.make_tensor("one_f", TensorProto.FLOAT, [], [1.0])),
        oh.make_node("ReduceSum", ["top_w", "axis_last"], ["top_sum"], keepdims=1),
        oh.make_node("Mul", ["top_sum", "norm_f"], ["den_a"]),
        oh.make_node("Sub", ["one_f", "norm_f"], ["den_b"]),
        oh.make_node("Add", ["den_a", "den_b"], ["den"]),
        oh.make_node("Div", ["top_w", "den"], ["top_wn"]),
        oh.make_node("CastLike", ["top_wn", "x"], ["top_wt"]),  # router returns model-dtype weights
        # dense [N, E] routing matrix, zero for experts not chosen
        oh.make_node("Shape", ["router_logits"], ["ne_shape"]),
        oh.make_node("ConstantOfShape", ["ne_shape"], ["zeros_f"],
                     value=oh.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        oh.make_node("CastLike", ["zeros_f", "x"], ["zeros"]),
        oh.make_node("ScatterElements", ["zeros", "top_i", "top_wt"], ["dense_w"], axis=1),
        oh.make_node("Transpose", ["dense_w"], ["dense_wt"], perm=[1, 0]),       # [E, N]
        oh.make_node("Unsqueeze", ["dense_wt", "axis_last"], ["w_en1"]),         # [E, N, 1]
        # --- experts, all of them, batched over E ---
        oh.make_node("Unsqueeze", ["x", "axis0"], ["x1"]),                       # [1, N, H]
        oh.make_node("Transpose", ["fc1"], ["fc1_t"], perm=[0, 2, 1]),           # [E, H, 2I]
        oh.make_node("MatMul", ["x1", "fc1_t"], ["h"]),                          # [E, N, 2I]
        i64("pair_shape", [0, 0, -1, 2]),
        oh.make_node("Reshape", ["h", "pair_shape"], ["h_pairs"]),               # [E, N, I, 2]
        oh.make_node("Constant", [], ["idx0"], value=oh.make_tensor("idx0", TensorProto.INT64, [], [0])),
        oh.make_node("Constant", [], ["idx1"], value=oh.make_tensor("idx1", TensorProto.INT64, [], [1])),
        oh.make_node("Gather", ["h_pairs", "idx0"], ["gate"], axis=3),           # [E, N, I]
        oh.make_node("Gather", ["h_pairs", "idx1"], ["up"], axis=3),
        oh.make_node("Sigmoid", ["gate"], ["gate_sig"]),
        oh.make_node("Mul", ["gate", "gate_sig"], ["gate_act"]),
        oh.make_node("Mul", ["gate_act", "up"], ["act"]),
        oh.make_node("Transpose", ["fc2"], ["fc2_t"], perm=[0, 2, 1]),           # [E, I, H]
        oh.make_node("MatMul", ["act", "fc2_t"], ["o"]),                         # [E, N, H]
        oh.make_node("Mul", ["o", "w_en1"], ["o_w"]),
        oh.make_node("ReduceSum", ["o_w", "axis0"], ["y"], keepdims=0),          # [N, H]
    ]
    return nodes, []


def onnx_functions(opset: int, body: str = "contrib") -> list[onnx.FunctionProto]:
    """FunctionProtos defining ``dualbrain::MoEDispatch``; ``opset`` must equal the model's
    default-domain opset (>= 13)."""
    if opset < 13:
        raise ValueError(f"MoEDispatch function needs default-domain opset >= 13, got {opset}")
    if body == "contrib":
        nodes, extra = _contrib_body()
    elif body == "standard":
        nodes, extra = _standard_body()
    else:
        raise ValueError(f"body must be 'contrib' or 'standard', got {body!r}")
    fn = oh.make_function(
        DOMAIN, OP_TYPE, _INPUTS, _OUTPUTS, nodes,
        opset_imports=[oh.make_opsetid("", opset), *extra],
        attributes=["top_k"],
        attribute_protos=[oh.make_attribute("normalize", 1)],
        doc_string=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    return [fn]


def add_functions_to_model(model: onnx.ModelProto, body: str = "contrib") -> onnx.ModelProto:
    """Attach the MoEDispatch function with `body` to ``model`` in place (idempotent; see
    :func:`dualbrain.plugins.attach_functions`)."""
    from dualbrain.plugins import attach_functions, default_opset

    attach_functions(model, onnx_functions(default_opset(model), body))
    return model
