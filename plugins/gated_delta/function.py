"""ONNX FunctionProtos for ``dualbrain::GatedDeltaRule`` and ``dualbrain::GatedDeltaRuleWindow``.

Inputs (float32): q, k (B, T, Hk, dk); v (B, T, Hv, dv); g, beta (B, T, Hv); state (B, Hv, dk, dv).
Node attributes: num_k_heads (Hk), num_v_heads (Hv).

* GatedDeltaRule (default, ``use_contrib=True``): q/k/v reshaped to the packed [B, T, H*D] layout,
  then ONE ``com.microsoft.LinearAttention`` (update_rule="gated_delta", scale=1.0,
  q_num_heads=@num_k_heads, kv_num_heads=@num_v_heads; decay input = g in log space), output
  reshaped back to v's shape.  Its recurrence S = e^g S + beta k (v - e^g S^T k) is the same math.
* GatedDeltaRuleWindow (and GatedDeltaRule with ``use_contrib=False``): a standard ONNX ``Loop``
  over T with the exact recurrence; states are Loop scan outputs.  (ORT's CPU LinearAttention
  rejects ``state_window`` > 0, and that attribute is capped at 8 anyway.)
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .reference import DOMAIN, OP_TYPE, OP_TYPE_WINDOW, VERSION

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_WINDOW", "VERSION", "onnx_functions"]
MS_DOMAIN = "com.microsoft"

_INPUTS = ["q", "k", "v", "g", "beta", "state"]
_ATTRS = ["num_k_heads", "num_v_heads"]


def _ci64(name, vals, scalar=False):
    dims = [] if scalar else [len(vals)]
    return helper.make_node("Constant", [], [name],
                            value=helper.make_tensor(name + "_t", TensorProto.INT64, dims, list(vals)))


def _aref(name, ref, typ=onnx.AttributeProto.INT):
    a = helper.make_attribute_ref(name, typ)
    a.ref_attr_name = ref
    return a


def _build_contrib(opset: int) -> onnx.FunctionProto:
    la = helper.make_node("LinearAttention", ["q3", "k3", "v3", "state", "g", "beta"], ["o3", "new_state"],
                          domain=MS_DOMAIN, update_rule="gated_delta", scale=1.0)
    la.attribute.extend([_aref("q_num_heads", "num_k_heads"), _aref("kv_num_heads", "num_v_heads")])
    nodes = [
        _ci64("pk3", [0, 0, -1]),
        helper.make_node("Reshape", ["q", "pk3"], ["q3"]),
        helper.make_node("Reshape", ["k", "pk3"], ["k3"]),
        helper.make_node("Reshape", ["v", "pk3"], ["v3"]),
        la,
        helper.make_node("Shape", ["v"], ["vshape"]),
        helper.make_node("Reshape", ["o3", "vshape"], ["o"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=_INPUTS, outputs=["o", "new_state"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=_ATTRS)


def _build_loop(opset: int, window: bool) -> onnx.FunctionProto:
    F = TensorProto.FLOAT
    # ---- outside the loop: time-major, head-grouped layouts -------------------------------------
    # S is carried as (B, Hk, r, dk, dv); per-step slices broadcast over the r value heads of a group.
    nodes = [
        helper.make_node("Shape", ["k"], ["B1"], start=0, end=1),
        helper.make_node("Shape", ["k"], ["T1"], start=1, end=2),
        helper.make_node("Shape", ["k"], ["Hk1"], start=2, end=3),
        helper.make_node("Shape", ["k"], ["dk1"], start=3, end=4),
        helper.make_node("Shape", ["v"], ["Hv1"], start=2, end=3),
        helper.make_node("Shape", ["v"], ["dv1"], start=3, end=4),
        helper.make_node("Div", ["Hv1", "Hk1"], ["r1"]),
        _ci64("one1", [1]),
        _ci64("m1", [-1]),
        helper.make_node("Concat", ["B1", "Hk1", "r1", "dk1", "dv1"], ["s5shape"], axis=0),
        helper.make_node("Reshape", ["state", "s5shape"], ["S0"]),
        # q, k rows (T, B, Hk, 1, 1, dk); k column (T, B, Hk, 1, dk, 1)
        helper.make_node("Transpose", ["q"], ["qT"], perm=[1, 0, 2, 3]),
        helper.make_node("Transpose", ["k"], ["kT"], perm=[1, 0, 2, 3]),
        _ci64("ax34", [3, 4]),
        _ci64("ax35", [3, 5]),
        helper.make_node("Unsqueeze", ["qT", "ax34"], ["qRow"]),
        helper.make_node("Unsqueeze", ["kT", "ax34"], ["kRow"]),
        helper.make_node("Unsqueeze", ["kT", "ax35"], ["kCol"]),
        # v (T, B, Hk, r, 1, dv); exp(g), beta (T, B, Hk, r, 1, 1)
        helper.make_node("Transpose", ["v"], ["vT"], perm=[1, 0, 2, 3]),
        helper.make_node("Concat", ["T1", "B1", "Hk1", "r1", "one1", "dv1"], ["v6shape"], axis=0),
        helper.make_node("Reshape", ["vT", "v6shape"], ["vG"]),
        helper.make_node("Concat", ["T1", "B1", "Hk1", "r1", "one1", "one1"], ["h6shape"], axis=0),
        helper.make_node("Transpose", ["g"], ["gT"], perm=[1, 0, 2]),
        helper.make_node("Exp", ["gT"], ["egT"]),
        helper.make_node("Reshape", ["egT", "h6shape"], ["eG"]),
        helper.make_node("Transpose", ["beta"], ["bT"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["bT", "h6shape"], ["bG"]),
        _ci64("ax0", [0]),
        helper.make_node("Squeeze", ["T1", "ax0"], ["Tn"]),
    ]
    # ---- loop body -------------------------------------------------------------------------------
    body_nodes = [
        helper.make_node("Gather", ["eG", "i"], ["e_i"], axis=0),      # (B, Hk, r, 1, 1)
        helper.make_node("Mul", ["S_in", "e_i"], ["S1"]),
        helper.make_node("Gather", ["kRow", "i"], ["kr_i"], axis=0),   # (B, Hk, 1, 1, dk)
        helper.make_node("MatMul", ["kr_i", "S1"], ["kv"]),            # (B, Hk, r, 1, dv)
        helper.make_node("Gather", ["vG", "i"], ["v_i"], axis=0),      # (B, Hk, r, 1, dv)
        helper.make_node("Sub", ["v_i", "kv"], ["err"]),
        helper.make_node("Gather", ["bG", "i"], ["b_i"], axis=0),      # (B, Hk, r, 1, 1)
        helper.make_node("Mul", ["err", "b_i"], ["delta"]),
        helper.make_node("Gather", ["kCol", "i"], ["kc_i"], axis=0),   # (B, Hk, 1, dk, 1)
        helper.make_node("MatMul", ["kc_i", "delta"], ["upd"]),        # (B, Hk, r, dk, dv)
        helper.make_node("Add", ["S1", "upd"], ["S_out"]),
        helper.make_node("Gather", ["qRow", "i"], ["q_i"], axis=0),    # (B, Hk, 1, 1, dk)
        helper.make_node("MatMul", ["q_i", "S_out"], ["o_i"]),         # (B, Hk, r, 1, dv)
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    body_outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("S_out", F, None),
                    helper.make_tensor_value_info("o_i", F, None)]
    loop_outputs = ["S_fin", "o_seq"]
    if window:
        body_nodes.append(helper.make_node("Identity", ["S_out"], ["S_scan"]))
        body_outputs.append(helper.make_tensor_value_info("S_scan", F, None))
        loop_outputs.append("S_seq")
    body = helper.make_graph(
        body_nodes, "gated_delta_step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("S_in", F, None)],
        body_outputs)
    nodes.append(helper.make_node("Loop", ["Tn", "", "S0"], loop_outputs, body=body))
    # ---- back to the public layouts -------------------------------------------------------------
    nodes += [
        helper.make_node("Shape", ["state"], ["sshape"]),
        helper.make_node("Reshape", ["S_fin", "sshape"], ["new_state"]),
        helper.make_node("Concat", ["T1", "B1", "Hv1", "dv1"], ["o4shape"], axis=0),
        helper.make_node("Reshape", ["o_seq", "o4shape"], ["oT"]),
        helper.make_node("Transpose", ["oT"], ["o"], perm=[1, 0, 2, 3]),
    ]
    outputs = ["o", "new_state"]
    if window:
        nodes += [
            helper.make_node("Concat", ["T1", "B1", "Hv1", "dk1", "dv1"], ["st5shape"], axis=0),
            helper.make_node("Reshape", ["S_seq", "st5shape"], ["stT"]),
            helper.make_node("Transpose", ["stT"], ["states"], perm=[1, 0, 2, 3, 4]),
        ]
        outputs.append("states")
    return helper.make_function(
        DOMAIN, OP_TYPE_WINDOW if window else OP_TYPE, inputs=_INPUTS, outputs=outputs, nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=_ATTRS)


def onnx_functions(opset: int, use_contrib: bool = True) -> list[onnx.FunctionProto]:
    """FunctionProtos for GatedDeltaRule and GatedDeltaRuleWindow (domain "dualbrain").

    ``opset`` must equal the model's default-domain opset import.  With ``use_contrib`` (default)
    GatedDeltaRule's body is ``com.microsoft.LinearAttention`` (the model must then also import
    the "com.microsoft" domain, version 1); otherwise it is the standard-ops Loop.
    """
    main = _build_contrib(opset) if use_contrib else _build_loop(opset, False)
    return [main, _build_loop(opset, True)]
