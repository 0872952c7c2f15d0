"""TensorRT plugin description of ``dualbrain::GatedDeltaRule`` / ``GatedDeltaRuleWindow``.

Inputs q, k (B, T, Hk, dk), v (B, T, Hv, dv), g, beta (B, T, Hv), state (B, Hv, dk, dv), all float32
(the exporter computes the recurrence in float32 whatever the model dtype); outputs o (B, T, Hv, dv),
new_state (B, Hv, dk, dv) and, for the window variant, states (B, T, Hv, dk, dv), float32.
Fields ``num_k_heads``, ``num_v_heads``. Kernel in :mod:`.triton` (imported at enqueue only).
"""
from __future__ import annotations

from dualbrain.plugins.tensorrt import OpDesc

from .reference import OP_TYPE, OP_TYPE_WINDOW


def _dtypes(window: bool):
    return lambda ins, f: [ins[5]] * (3 if window else 2)


def _shapes(window: bool):
    def shapes(ins, f, expr):
        v, s = ins[2], ins[5]
        outs = [[v[0], v[1], v[2], v[3]], [s[0], s[1], s[2], s[3]]]
        if window:
            outs.append([v[0], v[1], s[1], s[2], s[3]])
        return outs
    return shapes


def _supports(pos, types, num_inputs, f, trt):
    return types[pos] == trt.DataType.FLOAT


def workspace_size(ins, outs, f) -> int:
    """float32 scratch of the chunked kernel (:func:`.triton.chunk_workspace_numel`), 0 without Triton."""
    try:
        from .triton import chunk_workspace_numel
    except ImportError:           # building engines needs no Triton; enqueue does
        return 0
    (B, T, Hv, dv), (_, _, dk, _) = ins[2], ins[5]
    return 4 * int(chunk_workspace_numel(max(B, 0), max(T, 0), Hv, dk, dv))


def _launch(window: bool):
    def launch(ins, outs, workspace, f):
        import torch

        from .triton import gated_delta_rule

        q, k, v, g, beta, state = ins
        ws = workspace.view(torch.float32) if workspace is not None else None
        gated_delta_rule(q, k, v, g, beta, state, window=window, out=tuple(outs), workspace=ws)
    return launch


DESCS = [
    OpDesc(name=OP_TYPE_WINDOW if w else OP_TYPE, num_outputs=3 if w else 2,
           fields=(("num_k_heads", "int"), ("num_v_heads", "int")),
           output_dtypes=_dtypes(w), output_shapes=_shapes(w), supports=_supports, launch=_launch(w),
           workspace=workspace_size)
    for w in (False, True)
]
