"""TensorRT plugin description of ``dualbrain::MoEDispatch``.

Inputs x (N, H), router_logits (N, E), fc1 (E, 2I, H) gate/up interleaved, fc2 (E, H, I), all in the
model dtype; output y (N, H) in x's dtype. Fields ``top_k``, ``normalize`` (0/1). The workspace holds
the routing (weights + expert ids, N*top_k each) and the per-(token, slot) SwiGLU activations
(N*top_k*I float32). Kernel in :mod:`.triton` (imported at enqueue only).
"""
from __future__ import annotations

from dualbrain.plugins.tensorrt import FLOAT_TYPES as FLOATS
from dualbrain.plugins.tensorrt import OpDesc

from .reference import OP_TYPE



def _shapes(ins, f, expr):
    x = ins[0]
    return [[x[0], x[1]]]


def _supports(pos, types, num_inputs, f, trt):
    if pos == 0:
        return types[0] in tuple(getattr(trt.DataType, n) for n in FLOATS)
    return types[pos] == types[0]


def workspace_size(ins, outs, f) -> int:
    n = max(int(ins[0][0]), 0)
    inter = int(ins[3][2])
    k = int(f["top_k"])
    align = 256
    routing = n * k * (4 + 8)                 # float32 weights + int64 expert ids
    act = n * k * inter * 4                   # float32 SwiGLU activations
    size = sum(-(-b // align) * align for b in (routing, act))
    try:                          # the kernel's own sizing when Triton (and torch) are importable
        import torch

        from .triton import workspace_bytes
    except ImportError:
        return size
    H, E = int(ins[0][1]), int(ins[1][1])
    return max(size, int(workspace_bytes(n, H, inter, E, k, dtype=torch.float32)))


def _launch(ins, outs, workspace, f):
    from .triton import moe_dispatch_triton

    x, logits, fc1, fc2 = ins
    moe_dispatch_triton(x, logits, fc1, fc2, int(f["top_k"]), bool(f["normalize"]), out=outs[0], workspace=workspace)


DESCS = [
    OpDesc(name=OP_TYPE, num_outputs=1, fields=(("top_k", "int"), ("normalize", "int")),
           output_dtypes=lambda ins, f: [ins[0]], output_shapes=_shapes, supports=_supports,
           launch=_launch, workspace=workspace_size, defaults={"normalize": 1}),
]
