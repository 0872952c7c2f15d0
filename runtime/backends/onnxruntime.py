"""ONNX Runtime backend: one InferenceSession per block, shared by every generation and thread.

Window variants (and the linked window graph) get their sessions on first use: plain generation
never loads them."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.manifest import BlockInfo, Manifest, safe_child

LINKED = "__linked__"
WINDOW = ".window"


def check_external_data(model_dir: Path, model) -> None:
    """Refuse external-data locations that are absolute or escape the model directory."""
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                safe_child(model_dir, entry.value, f"external data of {t.name!r}")


def bf16_to_fp32(model) -> None:
    """Rewrite a bf16 graph to compute in fp32 (ONNX Runtime's CPU build has no bf16 kernels)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT

    def fix_tensor(t):
        if t.data_type == bf16:
            arr = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def fix_graph(g):
        for t in g.initializer:
            fix_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == bf16:
                vi.type.tensor_type.elem_type = f32
        fix_nodes(g.node)

    def fix_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.name in ("to", "dtype", "output_dtype") and a.type == onnx.AttributeProto.INT and a.i == bf16:
                    a.i = f32
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)
                for sub in a.graphs:
                    fix_graph(sub)

    fix_graph(model.graph)
    for f in model.functions:
        fix_nodes(f.node)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None, linked: bool = True, cpu_mem_arena: bool = False):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self._ort = ort
        self._lock = threading.Lock()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Sequence lengths grow every decode step; ORT's CPU arena keeps a block for each new size and
        # grows without bound over long generations (measured: ~9 KB/token). Plain malloc/free does not.
        opts.enable_cpu_mem_arena = cpu_mem_arena
        # ORT caches a memory plan per distinct input shape; every decode step is a new shape
        opts.enable_mem_pattern = False
        if threads:
            opts.intra_op_num_threads = threads
        self._opts = opts
        self._providers = providers or ["CPUExecutionProvider"]
        self.sessions: dict[str, object] = {}
        self.convert_bf16 = manifest.dtype == "bfloat16" and self._providers == ["CPUExecutionProvider"]
        self._files = {b.name: b.file for b in manifest.blocks}
        self._files.update({b.name + WINDOW: b.window_file for b in manifest.blocks if b.window_file})
        if manifest.linked and linked:
            self._files[LINKED] = manifest.linked
            if manifest.linked_window:
                self._files[LINKED + WINDOW] = manifest.linked_window
        for b in manifest.chain:      # side blocks (the MTP head) load when a mode first runs them
            self._session(b.name)
        if LINKED in self._files:
            self._session(LINKED)

    def _session(self, name: str):
        if name in self.sessions:
            return self.sessions[name]
        with self._lock:
            if name not in self.sessions:
                self.sessions[name] = self._load(name, self._files[name])
        return self.sessions[name]

    def _load(self, name: str, file: str):
        import onnx

        path = safe_child(self.model_dir, file, "manifest.json")
        try:
            model = onnx.load(str(path), load_external_data=False)
            check_external_data(self.model_dir, model)
            if self.convert_bf16:
                onnx.load_external_data_for_model(model, str(self.model_dir))
                bf16_to_fp32(model)
                return self._ort.InferenceSession(model.SerializeToString(), self._opts, providers=self._providers)
            return self._ort.InferenceSession(str(path), self._opts, providers=self._providers)
        except DualbrainError:
            raise
        except Exception as e:  # onnx / onnxruntime raise assorted types on corrupt files
            raise DualbrainError(f"cannot load {name} ({file}): {str(e).splitlines()[0]}") from None

    @property
    def has_linked(self) -> bool:
        return LINKED in self._files

    def run_linked(self, feeds: dict[str, np.ndarray], outputs: list[str], *, window: bool = False
                   ) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self._session(LINKED + WINDOW if window else LINKED).run(outputs, feeds)))

    def compute_dtype(self, dtype: str) -> str:
        return "float32" if dtype == "bfloat16" and self.convert_bf16 else dtype

    def run(self, block: BlockInfo, feeds: dict[str, np.ndarray], *, window: bool = False) -> dict[str, np.ndarray]:
        names = [t.name for t in block.graph(window)[1]]
        outs = self._session(block.name + WINDOW if window else block.name).run(names, feeds)
        return dict(zip(names, outs))


def load(model_dir, manifest, **options) -> OrtBackend:
    return OrtBackend(Path(model_dir), manifest, **options)
