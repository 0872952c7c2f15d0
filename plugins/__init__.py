"""Our own ops: one folder per op (`OPS`), each with a numpy reference that also states the op's
identity (`reference.IDENTITY`), a torch op (eager math + single ONNX node at export), the ONNX
function body for ONNX Runtime, Triton kernels and a TensorRT plugin description (`trt.DESCS`).

Nothing here imports torch, onnx or TensorRT at import time."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

OPS = ("causal_conv", "gated_delta", "moe_dispatch")
DOMAIN = "dualbrain"


@dataclass(frozen=True)
class OpIdentity:
    """Who an op is in a graph: ONNX domain, op type (and the window variant's), version.

    The torch op emits nodes under it, the ONNX functions define it, the TensorRT plugins register
    under it (the parser maps a node of this domain to the plugin named like its op type)."""
    op_type: str
    window_op_type: str | None = None   # the variant that also returns the state after every position
    version: int = 1
    domain: str = DOMAIN

    @property
    def op_types(self) -> tuple[str, ...]:
        return (self.op_type,) + ((self.window_op_type,) if self.window_op_type else ())


def op_module(op: str, part: str):
    """`dualbrain.plugins.<op>.<part>` (reference, op, function, triton, trt)."""
    return importlib.import_module(f"dualbrain.plugins.{op}.{part}")


def identities() -> list[OpIdentity]:
    return [op_module(op, "reference").IDENTITY for op in OPS]


def all_onnx_functions(opset: int) -> list:
    """The ONNX FunctionProtos of every custom op, for default-domain version `opset`."""
    fns = []
    for op in OPS:
        fns.extend(op_module(op, "function").onnx_functions(opset))
    return fns


def default_opset(model) -> int:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("model has no default-domain opset import")
    return opset


def attach_functions(model, functions: list | None = None, *, used_only: bool = False) -> int:
    """Attach custom-op ONNX functions to `model` in place (idempotent); returns its default opset.

    `functions`: FunctionProtos to attach (default: every op's, for the model's opset); with
    `used_only`, only those whose (domain, name) some node of the graph uses. A function already
    in the model under the same (domain, name) is replaced. The opset imports the functions need
    (their own, and each op's domain at its version) are added; a conflicting version is an error."""
    opset = default_opset(model)
    fns = list(all_onnx_functions(opset) if functions is None else functions)
    if used_only:
        used = {(n.domain, n.op_type) for n in model.graph.node}
        fns = [f for f in fns if (f.domain, f.name) in used]
    names = {(f.domain, f.name) for f in fns}
    keep = [f for f in model.functions if (f.domain, f.name) not in names]
    del model.functions[:]
    model.functions.extend(keep + fns)
    versions = {ident.domain: ident.version for ident in identities()}
    have = {o.domain: o.version for o in model.opset_import}
    for f in fns:
        needs = [(o.domain, o.version) for o in f.opset_import] + [(f.domain, versions.get(f.domain, 1))]
        for domain, version in needs:
            if domain not in have:
                model.opset_import.add(domain=domain, version=version)
                have[domain] = version
            elif have[domain] != version:
                raise ValueError(f"model imports {domain!r} version {have[domain]}, function needs {version}")
    return opset
