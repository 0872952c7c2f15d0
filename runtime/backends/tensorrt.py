"""TensorRT backend: one deserialized engine per block (built by `dualbrain build`), run on the GPU.

Thin by design: state handling, sampling and generation are the shared runtime's. Loading checks,
before anything needs a GPU, that the engines were built from this export, with the installed
TensorRT flavour and version, for this GPU's compute capability; only then are the plugins
registered and the engines deserialized. ``run`` binds torch CUDA buffers and enqueues on a stream.

Options (``Model.load(out, backend="tensorrt", engines=ENGINES)``):
    engines            the engines directory (default: OUT/engines)
    device             CUDA device index (default 0)
    device_capability  "8.9" or (8, 9): skip GPU detection (for tests and checks)
    verify_hashes      check every engine's sha256 (sizes are always checked)

Needs a GPU; CI has none, so only the checks before deserialising are tested. TensorRT and torch
are imported only when this backend is loaded.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.dtypes import torch_dtype
from dualbrain.runtime.engines import ENGINE_MANIFEST, EngineManifest, capability_str
from dualbrain.runtime.manifest import BlockInfo, Manifest, file_digest, safe_child

def _detect_capability(device: int) -> str:
    try:
        import torch
    except ImportError:
        raise DualbrainError("the tensorrt backend needs torch with CUDA (pip install torch)") from None
    if not torch.cuda.is_available():
        raise DualbrainError("the tensorrt backend needs a CUDA GPU, and none is available")
    return capability_str(torch.cuda.get_device_capability(device))


class TensorRTBackend:
    name = "tensorrt"
    has_linked = False    # one engine per block (recipes refuse linked = true for now)

    def __init__(self, model_dir: Path, manifest: Manifest, engines: str | Path | None = None, device: int = 0,
                 device_capability=None, verify_hashes: bool = False):
        from dualbrain.plugins.tensorrt import FLAVOURS, import_tensorrt

        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.engines_dir = Path(engines) if engines is not None else self.model_dir / "engines"
        em = EngineManifest.read(self.engines_dir)
        if em.flavour not in FLAVOURS:
            raise DualbrainError(f"{ENGINE_MANIFEST}: unknown TensorRT flavour {em.flavour!r}")
        trt, flavour = import_tensorrt(em.flavour)
        cc = capability_str(device_capability) if device_capability is not None else None
        # Everything up to here needs no GPU: check with a placeholder capability first so a
        # version mismatch is reported even on a machine without a GPU.
        em.check(manifest, flavour=flavour, version=str(trt.__version__),
                 device_capability=cc or em.compute_capabilities[0])
        if cc is None:
            cc = _detect_capability(device)
            em.check(manifest, flavour=flavour, version=str(trt.__version__), device_capability=cc)
        paths = {}
        for name, eb in ((n, e) for block in em.blocks for n, e in block.engines().items()):
            p = safe_child(self.engines_dir, eb.engine, ENGINE_MANIFEST)
            if not p.is_file():
                raise DualbrainError(f"missing engine {eb.engine} listed in {ENGINE_MANIFEST}")
            if p.stat().st_size != eb.size:
                raise DualbrainError(f"engine {eb.engine} is {p.stat().st_size} bytes, {ENGINE_MANIFEST} "
                                     f"records {eb.size}: truncated or modified")
            if verify_hashes and file_digest(p)["sha256"] != eb.sha256:
                raise DualbrainError(f"engine {eb.engine} does not match its sha256: corrupted or modified")
            paths[name] = p
        self.em = em
        self.max_batch = em.max_batch or None            # 0: an engine manifest from before the limits
        self.max_new_positions = em.max_new_positions or None
        self.trt = trt
        self._load(paths, device)

    # GPU from here on -------------------------------------------------------------------------
    def _load(self, paths: dict[str, Path], device: int) -> None:
        import torch

        from dualbrain.plugins.tensorrt import register_plugins

        trt = self.trt
        register_plugins(trt)
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.profile_names = [p.get("name") for p in self.em.profiles] or ["prefill"]
        self.engines, self.contexts, self.locks = {}, {}, {}
        self.stream = torch.cuda.Stream(self.device)
        for name, p in paths.items():
            engine = self.runtime.deserialize_cuda_engine(p.read_bytes())
            if engine is None:
                raise DualbrainError(f"TensorRT cannot deserialize engine {p.name} (see the log above)")
            ctxs = []
            for i in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
                ctxs.append(ctx)
            self.engines[name], self.contexts[name], self.locks[name] = engine, ctxs, threading.Lock()
        self.stream.synchronize()

    def compute_dtype(self, dtype: str) -> str:
        return dtype

    def run_linked(self, feeds, outputs, *, window: bool = False):
        raise DualbrainError("the tensorrt backend has no whole-model engine")

    def _profile(self, name: str, block: BlockInfo, feeds: dict[str, np.ndarray]) -> int:
        seq = next((feeds[t.name].shape[i] for t in block.inputs for i, d in enumerate(t.shape) if d == "seq"), None)
        if seq == 1 and "decode" in self.profile_names and len(self.contexts[name]) > 1:
            return self.profile_names.index("decode")
        return 0

    def run(self, block: BlockInfo, feeds: dict[str, np.ndarray], *, window: bool = False) -> dict[str, np.ndarray]:
        import torch

        name = f"{block.name}.window" if window else block.name
        if name not in self.contexts:
            raise DualbrainError(f"no engine for the window variant of {block.name}: rebuild with `dualbrain build`")
        ctx = self.contexts[name][self._profile(name, block, feeds)]
        with self.locks[name], torch.cuda.stream(self.stream):
            keep = []
            for t in block.inputs:
                x = _to_torch(feeds[t.name], self.device)
                keep.append(x)
                ctx.set_input_shape(t.name, tuple(x.shape))
                ctx.set_tensor_address(t.name, x.data_ptr())
            outs = {}
            for t in block.graph(window)[1]:
                shape = tuple(ctx.get_tensor_shape(t.name))
                y = torch.empty(shape, dtype=torch_dtype(t.dtype), device=self.device)
                ctx.set_tensor_address(t.name, y.data_ptr())
                outs[t.name] = y
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise DualbrainError(f"TensorRT failed to run block {block.name}")
            self.stream.synchronize()
        return {n: _to_numpy(y) for n, y in outs.items()}


def _to_torch(a, device):
    import torch

    if isinstance(a, torch.Tensor):
        return a.to(device).contiguous()
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":                      # ml_dtypes: no torch equivalent in numpy
        return torch.from_numpy(a.view(np.int16)).to(device).view(torch.bfloat16)
    return torch.from_numpy(a).to(device)


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load(model_dir, manifest, **options) -> TensorRTBackend:
    return TensorRTBackend(Path(model_dir), manifest, **options)
