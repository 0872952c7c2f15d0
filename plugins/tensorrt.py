"""TensorRT plugins for our custom ops: one generic IPluginV3 built from a small per-op description.

Each ``plugins/<op>/trt.py`` holds only an :class:`OpDesc` (name, fields, output dtypes and shapes,
supported types, workspace size, launch); this module turns every description into a class-based
``IPluginV3`` (+ ``IPluginV3OneCore/Build/Runtime``) and an ``IPluginCreatorV3One`` and registers
them under the ``dualbrain`` namespace (:func:`register_plugins`).

How a plugin layer gets into a network: the ONNX parser maps a node of domain ``dualbrain`` to a
plugin named like its op_type *when the node carries the string attribute* ``plugin_namespace``
(:func:`tensorrt_onnx` adds it); the node's other attributes become plugin fields. Without it the
parser inlines the graph's ONNX function instead.

Two flavours: TensorRT-RTX (``tensorrt_rtx``, pip-installable, builds ahead of time without a GPU)
and enterprise TensorRT (``tensorrt``; its wheels are download stubs on the package index, so that
path is a thin, untested alternative: same plugin API, only the import differs).

The TensorRT-RTX parser aborts the whole process when it adds a plugin layer unless
``libtensorrt_rtx.so`` (unversioned) resolves; the wheel ships only ``.so.1``. :func:`library_env`
creates the missing symlink in a cache directory and returns an environment whose
``LD_LIBRARY_PATH`` contains it; the builder runs the parse in a child process started with it.

Nothing here imports TensorRT, torch or Triton at module import time.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dualbrain.errors import DualbrainError
from dualbrain.plugins import DOMAIN, OPS, op_module
from dualbrain.runtime.dtypes import FLOAT_DTYPES, dtype

NAMESPACE = DOMAIN      # plugins register under the ops' ONNX domain: the parser maps one to the other
# trt.DataType names of the float dtypes a plugin may take (runtime.dtypes)
FLOAT_TYPES = tuple(dtype(n).trt for n in FLOAT_DTYPES)
PLUGIN_VERSION = "1"
FLAVOURS = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}   # flavour -> Python module
FLAVOUR_LABELS = {"tensorrt-rtx": "TensorRT-RTX", "tensorrt": "TensorRT"}


# --------------------------------------------------------------------------------------------------
# Importing TensorRT


def available_flavours() -> list[str]:
    """Installed TensorRT flavours, without importing them."""
    return [f for f, mod in FLAVOURS.items() if importlib.util.find_spec(mod) is not None
            and (mod != "tensorrt_rtx" or importlib.util.find_spec("tensorrt_rtx_libs") is not None)]


def import_tensorrt(flavour: str | None = None) -> tuple[Any, str]:
    """(module, flavour): TensorRT-RTX first, then enterprise TensorRT; or exactly `flavour`."""
    order = [flavour] if flavour else list(FLAVOURS)
    for fl in order:
        if fl not in FLAVOURS:
            raise DualbrainError(f"unknown TensorRT flavour {fl!r} (choose from {', '.join(FLAVOURS)})")
        try:
            return importlib.import_module(FLAVOURS[fl]), fl
        except ImportError:
            continue
    if flavour == "tensorrt":
        have = available_flavours()
        raise DualbrainError("this needs enterprise TensorRT (module `tensorrt`), which is not installed"
                             + (f"; only {', '.join(have)} is" if have else "")
                             + " (NVIDIA's tensorrt wheels are download stubs on PyPI: install it from NVIDIA)")
    if flavour:
        raise DualbrainError(f"TensorRT flavour {flavour} is not installed: pip install 'dualbrain[rtx]'")
    raise DualbrainError("no TensorRT installed: pip install 'dualbrain[rtx]' (TensorRT-RTX)")


def trt_version(trt) -> str:
    return str(trt.__version__)


# --------------------------------------------------------------------------------------------------
# The libtensorrt_rtx.so symlink and the environment the parser needs


def _cache_root() -> Path:
    base = os.environ.get("DUALBRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dualbrain")
    return Path(base)


def library_dir(flavour: str = "tensorrt-rtx") -> Path | None:
    """A directory holding ``libtensorrt_rtx.so -> <site-packages>/tensorrt_rtx_libs/libtensorrt_rtx.so.1``.

    None for enterprise TensorRT (its wheels ship what they need). Created on first use in
    ``$DUALBRAIN_CACHE`` or ``~/.cache/dualbrain``, one directory per library location.
    """
    if flavour != "tensorrt-rtx":
        return None
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        raise DualbrainError("TensorRT-RTX is not installed: pip install 'dualbrain[rtx]'")
    libs = Path(list(spec.submodule_search_locations)[0])
    target = libs / "libtensorrt_rtx.so.1"
    if not target.is_file():
        raise DualbrainError(f"TensorRT-RTX installation is incomplete: {target} is missing")
    import hashlib

    import tempfile

    tag = hashlib.sha1(str(target.resolve()).encode()).hexdigest()[:12]
    error = None
    for root in (_cache_root(), Path(tempfile.gettempdir()) / f"dualbrain-{os.getuid()}"):
        d = root / "trt-libs" / tag
        link = d / "libtensorrt_rtx.so"
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not (link.is_symlink() and os.readlink(link) == str(target)):
                tmp = d / f".link-{os.getpid()}"
                if tmp.is_symlink() or tmp.exists():
                    tmp.unlink()
                tmp.symlink_to(target)
                os.replace(tmp, link)        # atomic: concurrent builds never see a half-made link
            return d
        except OSError as e:
            error = error or f"{d}: {e}"
    raise DualbrainError(f"cannot create the TensorRT-RTX library link ({error}); set DUALBRAIN_CACHE "
                         "to a writable directory")


def library_env(flavour: str = "tensorrt-rtx") -> dict[str, str]:
    """os.environ plus LD_LIBRARY_PATH with :func:`library_dir` first (for a child process)."""
    env = dict(os.environ)
    d = library_dir(flavour)
    if d is not None:
        old = env.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = str(d) + (os.pathsep + old if old else "")
    return env


def library_env_active(flavour: str = "tensorrt-rtx") -> bool:
    """Whether this process was started with :func:`library_dir` on LD_LIBRARY_PATH (parsing is safe)."""
    d = library_dir(flavour)
    return d is None or str(d) in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)


# --------------------------------------------------------------------------------------------------
# Per-op description


@dataclass(frozen=True)
class OpDesc:
    """What TensorRT needs to know about one plugin (op_type); everything else is generic.

    fields: (name, kind) with kind "int" (ONNX int attributes; the parser passes them as an
    integer plugin field). dtypes/shapes/supports receive the plugin's field values as a dict.

    output_dtypes(input_dtypes, fields) -> output dtypes (trt.DataType values).
    output_shapes(inputs, fields, expr) -> one list of dimension expressions per output; `inputs[i][d]`
        is input i's dimension d (an IDimensionExpr), `expr` is TensorRT's IExprBuilder.
    supports(pos, types, num_inputs, fields, trt) -> bool: `types` are the trt.DataType of every
        input then output (formats are checked generically: linear only).
    workspace(input_shapes, output_shapes, fields) -> bytes of scratch memory (max shapes at build).
    launch(inputs, outputs, workspace, fields): torch CUDA tensors, runs on the current stream (the
        generic code makes TensorRT's stream current); imports the op's Triton module lazily.
    """
    name: str
    num_outputs: int
    fields: tuple[tuple[str, str], ...]
    output_dtypes: Callable[[Sequence[Any], dict], list]
    output_shapes: Callable[[Sequence[Any], dict, Any], list]
    supports: Callable[..., bool]
    launch: Callable[..., None]
    workspace: Callable[[Sequence[tuple], Sequence[tuple], dict], int] = lambda i, o, f: 0
    version: str = PLUGIN_VERSION
    namespace: str = NAMESPACE
    defaults: dict = field(default_factory=dict)


def all_descs() -> list[OpDesc]:
    """Every op folder's trt.py exports DESCS: the plugin descriptions of that op (base + window variant)."""
    out = []
    for op in OPS:
        out.extend(op_module(op, "trt").DESCS)
    return out


def plugin_names() -> set[str]:
    return {d.name for d in all_descs()}


# --------------------------------------------------------------------------------------------------
# Generic plugin + creator (classes built once per TensorRT module)

_CLASSES: dict[str, tuple[type, type]] = {}
_REGISTERED: dict[str, list] = {}      # flavour -> creators (TensorRT keeps raw pointers: keep them alive)


def _field_values(desc: OpDesc, fc) -> dict:
    import numpy as np

    vals = dict(desc.defaults)
    for f in fc or ():
        if f.name in dict(desc.fields):
            data = np.asarray(f.data).reshape(-1)
            vals[f.name] = int(data[0]) if data.size else vals.get(f.name)
    missing = [n for n, _ in desc.fields if vals.get(n) is None]
    if missing:
        raise ValueError(f"plugin {desc.name}: missing field(s) {', '.join(missing)}")
    return vals


def _torch_dtype(trt, dt):
    from dualbrain.runtime.dtypes import from_trt, torch_dtype

    return torch_dtype(from_trt(trt, dt).name)


def wrap_device_pointer(ptr: int, shape: Sequence[int], dtype, device: int | None = None):
    """A torch CUDA tensor viewing `ptr` (memory owned by TensorRT) through __cuda_array_interface__.

    bfloat16 has no typestr: it is wrapped as int16 and viewed as bfloat16. GPU only, untested here.
    """
    import torch

    shape = tuple(int(s) for s in shape)
    carrier = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}.get(dtype, dtype)
    typestr = {torch.float32: "<f4", torch.float16: "<f2", torch.int16: "<i2", torch.int32: "<i4",
               torch.int64: "<i8", torch.int8: "|i1", torch.uint8: "|u1"}[carrier]

    class _Mem:
        __cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (int(ptr), False),
                                    "version": 3, "strides": None, "stream": None}

    t = torch.as_tensor(_Mem(), device="cuda" if device is None else f"cuda:{device}")
    return t.view(dtype) if carrier is not dtype else t


def plugin_classes(trt) -> tuple[type, type]:
    """(PluginClass, CreatorClass) for this TensorRT module; each instance is tied to one OpDesc."""
    key = trt.__name__
    if key in _CLASSES:
        return _CLASSES[key]

    class DualbrainPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """Generic IPluginV3 for one OpDesc. Build-time methods run without a GPU; enqueue needs one
        (it wraps TensorRT's buffers as torch CUDA tensors and calls the op's Triton launch) and is
        untested in CI, which has no GPU."""

        def __init__(self, desc: OpDesc, values: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.desc = desc
            self.values = dict(values)
            self.phase = phase
            self.num_outputs = desc.num_outputs
            self.plugin_namespace = desc.namespace
            self.plugin_name = desc.name
            self.plugin_version = desc.version
            # Same fields -> same timing: lets TensorRT skip re-timing identical instances.
            self.timing_cache_id = desc.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.values.items()))

        # IPluginV3
        def get_capability_interface(self, type):
            return self

        def clone(self):
            return DualbrainPlugin(self.desc, self.values, self.phase)

        # IPluginV3OneBuild
        def get_output_data_types(self, input_types):
            return list(self.desc.output_dtypes(list(input_types), self.values))

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            outs = []
            for dims in self.desc.output_shapes(list(inputs), self.values, expr_builder):
                d = trt.DimsExprs(len(dims))
                for i, e in enumerate(dims):
                    d[i] = expr_builder.constant(e) if isinstance(e, int) else e
                outs.append(d)
            return outs

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            types = [x.desc.type for x in in_out[:pos + 1]]
            return bool(self.desc.supports(pos, types, num_inputs, self.values, trt))

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return int(self.desc.workspace([tuple(x.max) for x in inp], [tuple(x.max) for x in out], self.values))

        def get_valid_tactics(self):
            return []

        # IPluginV3OneRuntime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            import numpy as np

            return trt.PluginFieldCollection([
                trt.PluginField(n, np.array([self.values[n]], dtype=np.int64), trt.PluginFieldType.INT64)
                for n, _ in self.desc.fields])

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            ins = [wrap_device_pointer(p, d.dims, _torch_dtype(trt, d.type)) for p, d in zip(inputs, input_desc)]
            outs = [wrap_device_pointer(p, d.dims, _torch_dtype(trt, d.type)) for p, d in zip(outputs, output_desc)]
            size = self.get_workspace_size_runtime(input_desc, output_desc)
            ws = wrap_device_pointer(workspace, (size,), torch.uint8) if size and workspace else None
            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
                self.desc.launch(ins, outs, ws, self.values)
            return 0

        def get_workspace_size_runtime(self, input_desc, output_desc):
            return int(self.desc.workspace([tuple(d.dims) for d in input_desc],
                                           [tuple(d.dims) for d in output_desc], self.values))

    class DualbrainPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, desc: OpDesc):
            trt.IPluginCreatorV3One.__init__(self)
            import numpy as np

            self.desc = desc
            self.name = desc.name
            self.plugin_namespace = desc.namespace
            self.plugin_version = desc.version
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(n, np.array([], dtype=np.int64), trt.PluginFieldType.INT64)
                for n, _ in desc.fields])

        def create_plugin(self, name, fc, phase):
            return DualbrainPlugin(self.desc, _field_values(self.desc, fc), phase)

    _CLASSES[key] = (DualbrainPlugin, DualbrainPluginCreator)
    return _CLASSES[key]


def register_plugins(trt=None, flavour: str | None = None) -> list:
    """Register a creator per plugin under namespace ``dualbrain``; idempotent. Returns the creators."""
    if trt is None:
        trt, flavour = import_tensorrt(flavour)
    key = trt.__name__
    if key in _REGISTERED:
        return _REGISTERED[key]
    _, Creator = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    creators = []
    for desc in all_descs():
        c = Creator(desc)
        if not registry.register_creator(c, desc.namespace):
            raise DualbrainError(f"TensorRT refused to register plugin {desc.namespace}::{desc.name}")
        creators.append(c)
    _REGISTERED[key] = creators
    return creators


# --------------------------------------------------------------------------------------------------
# ONNX for TensorRT


def tensorrt_onnx(path: str | os.PathLike):
    """The graph at `path` with ``plugin_namespace="dualbrain"`` on every ``dualbrain`` node.

    Loaded without its external data (weights stay on disk); parse the result with
    ``OnnxParser.parse(model.SerializeToString(), path=str(path))`` so the parser reads the weights
    from beside the original file. The model-local ONNX functions are dropped: plugins replace them.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    n = mark_plugin_nodes(model.graph)
    if n:
        del model.functions[:]
    return model


def mark_plugin_nodes(graph) -> int:
    """Add ``plugin_namespace`` to every ``dualbrain`` node (subgraphs too); returns how many."""
    import onnx

    count = 0
    for node in graph.node:
        if node.domain == NAMESPACE:
            if not any(a.name == "plugin_namespace" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("plugin_namespace", NAMESPACE))
            count += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                count += mark_plugin_nodes(a.g)
            for g in a.graphs:
                count += mark_plugin_nodes(g)
    return count


def write_tensorrt_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the plugin-marked copy of `src` to `dst` in the same directory as `src`'s weights.

    For tools that want a file (trtexec, polygraphy). `dst` must be in `src`'s directory so the
    external-data locations (relative) stay valid; the weights are not copied.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if src.parent.resolve() != dst.parent.resolve():
        raise DualbrainError(f"{dst} must be in the same directory as {src} (external data is relative)")
    onnx.save(tensorrt_onnx(src), str(dst))
    return dst

