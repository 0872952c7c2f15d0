"""TensorRT plugin description of ``dualbrain::CausalConv1d`` / ``CausalConv1dWindow``.

Inputs x (B, T, C), weight (C, K), conv_state (B, C, K-1), all in the model dtype (float32, float16 or
bfloat16); outputs y (B, T, C), new_state (B, C, K-1) and, for the window variant,
states (B, T, C, K-1), in x's dtype. Field ``channels`` = C. The generic plugin lives in
:mod:`dualbrain.plugins.tensorrt`; the kernel in :mod:`.triton` (imported at enqueue only).
"""
from __future__ import annotations

from dualbrain.plugins.tensorrt import FLOAT_TYPES as FLOATS
from dualbrain.plugins.tensorrt import OpDesc

from .reference import OP_TYPE, OP_TYPE_WINDOW



def _dtypes(window: bool):
    return lambda ins, f: [ins[0]] * (3 if window else 2)


def _shapes(window: bool):
    def shapes(ins, f, expr):
        x, state = ins[0], ins[2]
        outs = [[x[0], x[1], x[2]], [state[0], state[1], state[2]]]
        if window:
            outs.append([x[0], x[1], x[2], state[2]])
        return outs
    return shapes


def _supports(pos, types, num_inputs, f, trt):
    if pos == 0:
        return types[0] in tuple(getattr(trt.DataType, n) for n in FLOATS)
    return types[pos] == types[0]     # weight, state and every output in x's dtype


def _launch(window: bool):
    def launch(ins, outs, workspace, f):
        from .triton import causal_conv1d_triton

        x, weight, conv_state = ins
        causal_conv1d_triton(x, weight, conv_state, *outs)
    return launch


DESCS = [
    OpDesc(name=OP_TYPE_WINDOW if w else OP_TYPE, num_outputs=3 if w else 2, fields=(("channels", "int"),),
           output_dtypes=_dtypes(w), output_shapes=_shapes(w), supports=_supports, launch=_launch(w))
    for w in (False, True)
]
