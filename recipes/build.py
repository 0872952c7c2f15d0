"""`dualbrain build`: an export + a recipe -> one serialized TensorRT engine per block + engines.json.

The parent process validates everything it can without TensorRT (recipe, export manifest,
precision, flavour availability, profiles), then runs the TensorRT part (parse with our plugins,
build, serialize) in a child process started with the LD_LIBRARY_PATH the TensorRT-RTX parser needs
(see :func:`dualbrain.plugins.tensorrt.library_env`); a process already started with it builds
in-process. The child reports progress as JSON lines on stdout. Output goes through
:func:`atomic_output_dir`: ENGINES appears only when every block was built.

TensorRT-RTX builds ahead of time without a GPU: networks are strongly typed (precision comes from
the ONNX graph), targets are set with ``IBuilderConfig.num_compute_capabilities`` +
``set_compute_capability(ComputeCapability.SM89, i)``; its timing cache calls are no-ops.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dualbrain.artifacts import atomic_output_dir
from dualbrain.errors import DualbrainError
from dualbrain.recipes.schema import Recipe, load_recipe
from dualbrain.runtime.engines import ENGINE_MANIFEST, EngineBlock, EngineManifest, EngineVariant, call_limits
from dualbrain.runtime.manifest import MANIFEST, Manifest, file_digest, load_manifest, safe_child

__all__ = ["ENGINE_MANIFEST", "build", "inspect_plugins", "profile_dims", "input_shapes", "run_job"]

TIMING_CACHE = "timing.cache"
PROFILE_NAMES = ("prefill", "decode")

Progress = Callable[[str, int, int], None]
# TensorRT's log, line by line: (severity, message); severity is an ILogger.Severity name, or "stdout"
# for what the TensorRT libraries print themselves (Myelin's internal errors).
Log = Callable[[str, str], None]
# ILogger.Severity names, most severe first; the worker forwards those up to the job's `log_level`
SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


# --------------------------------------------------------------------------------------------------
# Shapes


def profile_dims(recipe: Recipe, export_max_context: int) -> dict[str, dict[str, list[int]]]:
    """{profile name: {dim: [min, opt, max]}} for the symbolic dims batch, seq, past, total.

    The recipe's max_context is clamped to the export's. prefill: seq 1..max_prefill from any past;
    decode (if the recipe asks): seq 1 (optimised for) up to 2: TensorRT-RTX 1.7 has no fused
    attention kernel for a query length fixed at 1, and decomposed, its attention copies every row's
    K/V once per query head (4 GiB at rtx5090-int4's 8 rows of 65536 positions: the build fails).
    """
    p = recipe.profile
    ctx = min(p.max_context, export_max_context)
    max_seq = min(p.max_prefill, ctx)
    opt_seq = min(p.opt_prefill, max_seq)
    opt_ctx = min(p.opt_context, ctx)
    batch = [p.min_batch, p.opt_batch, p.max_batch]
    prefill = {"batch": batch, "seq": [1, opt_seq, max_seq], "past": [0, 0, ctx - 1],
               "total": [1, opt_seq, ctx]}
    out = {"prefill": prefill}
    if p.decode_profile:
        opt_past = min(opt_ctx, ctx - 1)
        out["decode"] = {"batch": batch, "seq": [1, 1, 2], "past": [0, opt_past, ctx - 1],
                         "total": [1, opt_past + 1, ctx]}
    return out


def input_shapes(shape: tuple, dims: dict[str, list[int]]) -> list[tuple[int, ...]]:
    """(min, opt, max) concrete shapes of a manifest shape under one profile's dims."""
    out = []
    for j in range(3):
        out.append(tuple(dims[d][j] if isinstance(d, str) else int(d) for d in shape))
    return out


# --------------------------------------------------------------------------------------------------
# Parent side


def check_compatible(recipe: Recipe, man: Manifest) -> None:
    recipe.check_precision(man.dtype, man.quant)
    if recipe.linked:
        raise DualbrainError(f"recipe {recipe.name}: linked = true (one engine for the whole model) "
                             "is not supported yet; set linked = false")


def check_flavour(recipe: Recipe) -> None:
    from dualbrain.plugins.tensorrt import available_flavours

    have = available_flavours()
    if recipe.flavour in have:
        return
    if recipe.flavour == "tensorrt":
        raise DualbrainError(
            f"recipe {recipe.name} needs enterprise TensorRT (module `tensorrt`, target {recipe.target}), "
            + (f"but only {', '.join(have)} is installed" if have else "which is not installed")
            + "; TensorRT-RTX cannot build for this target")
    raise DualbrainError(f"recipe {recipe.name} needs TensorRT-RTX, which is not installed: "
                         "pip install 'dualbrain[rtx]'")


def build(export_dir: str | os.PathLike, recipe: Recipe | str | os.PathLike, engines_dir: str | os.PathLike, *,
          progress: Progress | None = None, in_process: bool | None = None, log: Log | None = None,
          log_level: str = "INFO") -> dict[str, Any]:
    """Build engines for every block of `export_dir` into `engines_dir`; returns the engine manifest.

    A block TensorRT cannot build is a DualbrainError carrying the first error line of TensorRT's log;
    `log` receives the whole log (up to `log_level`) as it is written (`dualbrain --debug build`)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    export_dir, engines_dir = Path(export_dir), Path(engines_dir)
    man = load_manifest(export_dir)
    check_compatible(recipe, man)
    check_flavour(recipe)
    if engines_dir.resolve() == export_dir.resolve():
        raise DualbrainError("the engines directory must not be the export directory")
    profiles = profile_dims(recipe, man.max_context)
    # one engine per graph: every block, and the window variant beside each block that has one
    blocks = [{"name": name, "onnx": str(safe_child(export_dir, file, MANIFEST).resolve()),
               "inputs": [[t.name, list(t.shape)] for t in b.inputs]}
              for b in man.blocks for name, file in _graphs(b)]
    with atomic_output_dir(engines_dir) as part:
        old_cache = engines_dir / TIMING_CACHE
        if recipe.timing_cache and recipe.flavour == "tensorrt" and old_cache.is_file():
            shutil.copyfile(old_cache, part / TIMING_CACHE)
        job = {"kind": "build", "flavour": recipe.flavour, "recipe": recipe.to_json(), "profiles": profiles,
               "blocks": blocks, "out": str(part.resolve()), "log_level": log_level if log else None}
        t0 = time.perf_counter()
        results = run_job(job, progress=progress, in_process=in_process, log=log)
        seconds = round(time.perf_counter() - t0, 3)
        done = results["built"]
        engine_manifest = EngineManifest(
            flavour=recipe.flavour, tensorrt_version=results["tensorrt_version"],
            compute_capabilities=tuple(recipe.compute_capabilities), target=recipe.target,
            recipe=recipe.to_json(), profiles=tuple({"name": n, "dims": d} for n, d in profiles.items()),
            timing_cache=results.get("timing_cache"),
            export={"path": str(export_dir.resolve()), "dtype": man.dtype, "max_context": man.max_context,
                    "window": man.window, "manifest_sha256": file_digest(export_dir / MANIFEST)["sha256"],
                    "model": man.model.to_json()},
            blocks=tuple(EngineBlock(
                name=b.name, kind=b.kind, layer=b.layer, onnx=b.file, engine=done[b.name]["file"],
                size=done[b.name]["size"], sha256=done[b.name]["sha256"], build_seconds=done[b.name]["seconds"],
                plugins=tuple(done[b.name]["plugins"]), inputs=b.inputs, outputs=b.outputs, state=b.state,
                window=_variant(done.get(f"{b.name}.window")))
                for b in man.blocks),
            **call_limits(tuple({"name": n, "dims": d} for n, d in profiles.items())),
            build={"seconds": seconds, "worker_peak_rss_mib": results["peak_rss_mib"]})
        written = engine_manifest.write(part)
    return written


def _graphs(b) -> list[tuple[str, str]]:
    """(engine name, ONNX file) of a block's graphs: the block's own, then its window variant's."""
    return [(b.name, b.file)] + ([(f"{b.name}.window", b.window_file)] if b.window_file else [])


def _variant(r: dict | None) -> EngineVariant | None:
    return None if r is None else EngineVariant(r["file"], r["size"], r["sha256"], r["seconds"], tuple(r["plugins"]))


def inspect_plugins(export_dir: str | os.PathLike, flavour: str = "tensorrt-rtx",
                    in_process: bool | None = None) -> dict[str, list[dict]]:
    """Parse every block of `export_dir` with our plugins registered (no build); per block, the
    plugin layers found: {"layer", "type" (e.g. PLUGIN_V3), "plugin", "namespace", "fields"}."""
    export_dir = Path(export_dir)
    man = load_manifest(export_dir)
    blocks = [{"name": b.name, "onnx": str(safe_child(export_dir, b.file, MANIFEST).resolve())} for b in man.blocks]
    res = run_job({"kind": "inspect", "flavour": flavour, "blocks": blocks}, in_process=in_process)
    return res["plugins"]


def run_job(job: dict, *, progress: Progress | None = None, in_process: bool | None = None,
            log: Log | None = None) -> dict:
    """Run a TensorRT job in this process if it is safe to parse plugins here, else in a child."""
    from dualbrain.plugins.tensorrt import library_env, library_env_active

    flavour = job["flavour"]
    if in_process is None:
        in_process = library_env_active(flavour)
    if in_process:
        return _Worker(job, lambda ev: _on_event(ev, progress, log)).run()
    env = library_env(flavour)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen([sys.executable, "-m", "dualbrain.recipes.build"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    import threading

    err_lines: list[str] = []

    def drain():
        for line in proc.stderr:
            err_lines.append(line.rstrip())
            del err_lines[:-40]
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    result, error = None, None
    try:
        for line in proc.stdout:
            try:
                ev = json.loads(line) if line.startswith("{") else None
            except json.JSONDecodeError:
                ev = None
            if not isinstance(ev, dict) or "event" not in ev:
                if log and line.strip():
                    log("stdout", line.rstrip())
                continue
            if ev["event"] == "result":
                result = ev["result"]
            elif ev["event"] == "error":
                error = ev["message"]
            else:
                _on_event(ev, progress, log)
    except BaseException:
        proc.kill()
        raise
    finally:
        rc = proc.wait()
        t.join(timeout=5)
    if error:
        raise DualbrainError(error)
    if rc != 0 or result is None:
        tail = next((ln for ln in reversed(err_lines) if ln.strip()), "no message")
        raise DualbrainError(f"TensorRT worker failed (exit code {rc}): {tail}")
    return result


def _on_event(ev: dict, progress: Progress | None, log: Log | None = None) -> None:
    if progress and ev["event"] == "progress":
        progress(ev["name"], ev["done"], ev["total"])
    elif log and ev["event"] == "log":
        log(ev["severity"], ev["message"])


# --------------------------------------------------------------------------------------------------
# Child side: everything that touches TensorRT


class _Worker:
    def __init__(self, job: dict, emit: Callable[[dict], None]):
        self.job = job
        self.emit = emit

    def run(self) -> dict:
        from dualbrain.plugins.tensorrt import import_tensorrt, register_plugins

        self.trt, self.flavour = import_tensorrt(self.job["flavour"])
        register_plugins(self.trt)
        self.logger = _log_recorder(self.trt, self.job.get("log_level"), self.emit)
        return self.build() if self.job["kind"] == "build" else self.inspect()

    # parsing -----------------------------------------------------------------------------------
    def parse(self, builder, onnx_path: str):
        from dualbrain.plugins.tensorrt import tensorrt_onnx

        trt = self.trt
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        model = tensorrt_onnx(onnx_path)
        if not parser.parse(model.SerializeToString(), path=onnx_path):
            errs = [str(parser.get_error(i)).strip().splitlines()[0] for i in range(parser.num_errors)]
            raise DualbrainError(f"TensorRT cannot parse {Path(onnx_path).name}: {errs[0] if errs else 'unknown error'}")
        expected = sum(1 for n in model.graph.node if n.domain == "dualbrain")
        layers = self.plugin_layers(network)
        found = sum(1 for x in layers if x["namespace"] == "dualbrain")
        if found != expected:
            raise DualbrainError(f"{Path(onnx_path).name}: {expected} dualbrain nodes but {found} dualbrain plugin "
                                 "layers after parsing (the parser inlined the ONNX functions?)")
        return network, parser, layers

    def plugin_layers(self, network) -> list[dict]:
        trt = self.trt
        kinds = {trt.LayerType.PLUGIN_V3: trt.IPluginV3Layer, trt.LayerType.PLUGIN_V2: trt.IPluginV2Layer}
        out = []
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type not in kinds and layer.type != trt.LayerType.PLUGIN:
                continue
            info = {"layer": layer.name, "type": layer.type.name, "plugin": None, "namespace": None, "fields": {}}
            if layer.type == trt.LayerType.PLUGIN_V3:
                layer.__class__ = trt.IPluginV3Layer
                plugin = layer.plugin
                core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE) \
                    if hasattr(plugin, "get_capability_interface") else plugin
                info["plugin"] = getattr(core, "plugin_name", None)
                info["namespace"] = getattr(core, "plugin_namespace", None)
                info["fields"] = dict(getattr(plugin, "values", {}))
            out.append(info)
        return out

    def inspect(self) -> dict:
        builder = self.trt.Builder(self.logger)
        res = {}
        for i, b in enumerate(self.job["blocks"]):
            self.emit({"event": "progress", "name": b["name"], "done": i, "total": len(self.job["blocks"])})
            _, _, layers = self.parse(builder, b["onnx"])
            res[b["name"]] = layers
        return {"plugins": res, "tensorrt_version": self.trt.__version__}

    # building ----------------------------------------------------------------------------------
    def config(self, builder, network, recipe: dict):
        trt = self.trt
        cfg = builder.create_builder_config()
        cfg.builder_optimization_level = int(recipe["optimization_level"])
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(recipe["workspace_mib"]) << 20)
        if self.flavour == "tensorrt-rtx":
            ccs = recipe["compute_capabilities"]
            cfg.num_compute_capabilities = len(ccs)
            for i, cc in enumerate(ccs):
                enum = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""), None)
                if enum is None or not cfg.set_compute_capability(enum, i):
                    raise DualbrainError(f"TensorRT-RTX {trt.__version__} cannot target compute capability {cc}")
        # Enterprise TensorRT builds for the GPU it runs on (untested here: not installable).
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for pname, dims in self.job["profiles"].items():
            prof = builder.create_optimization_profile()
            for name, shape in self.block["inputs"]:
                if name not in inputs:
                    continue
                mn, opt, mx = input_shapes(shape, dims)
                prof.set_shape(name, mn, opt, mx)
            if cfg.add_optimization_profile(prof) < 0:
                raise DualbrainError(f"TensorRT refused the {pname} profile of block {self.block['name']}")
        return cfg

    def build(self) -> dict:
        trt = self.trt
        recipe = self.job["recipe"]
        out = Path(self.job["out"])
        blocks = self.job["blocks"]
        builder = trt.Builder(self.logger)
        cache = None
        cache_path = out / TIMING_CACHE
        use_cache = bool(recipe["timing_cache"]) and self.flavour == "tensorrt"   # a no-op in TensorRT-RTX
        built = {}
        for i, b in enumerate(blocks):
            self.block = b
            self.emit({"event": "progress", "name": b["name"], "done": i, "total": len(blocks)})
            t0 = time.perf_counter()
            network, parser, layers = self.parse(builder, b["onnx"])
            allow_decomposed_attention(trt, network)
            cfg = self.config(builder, network, recipe)
            if use_cache:
                if cache is None:
                    cache = cfg.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
                cfg.set_timing_cache(cache, True)
            self.logger.errors.clear()
            try:
                plan = builder.build_serialized_network(network, cfg)
            except Exception as e:  # noqa: BLE001 - TensorRT raises assorted types
                raise DualbrainError(f"TensorRT failed to build block {b['name']}: {str(e).splitlines()[0]}") from None
            if plan is None:
                raise DualbrainError(f"TensorRT failed to build block {b['name']}: {self.logger.first_error()} "
                                     "(`dualbrain --debug build` shows TensorRT's log)")
            path = out / f"{b['name']}.engine"
            with open(path, "wb") as f:
                f.write(memoryview(plan))
            del plan, network, parser, cfg
            digest = file_digest(path)
            built[b["name"]] = {"file": path.name, "size": digest["size"], "sha256": digest["sha256"],
                                "seconds": round(time.perf_counter() - t0, 3), "plugins": layers}
        self.emit({"event": "progress", "name": "done", "done": len(blocks), "total": len(blocks)})
        timing = None
        if use_cache and cache is not None:
            cache_path.write_bytes(memoryview(cache.serialize()))
            timing = TIMING_CACHE
        import resource

        # ru_maxrss is KiB on Linux; in process it is the whole process's peak
        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return {"built": built, "tensorrt_version": trt.__version__, "timing_cache": timing, "peak_rss_mib": peak}


def _log_recorder(trt, level: str | None, emit: Callable[[dict], None]):
    """A TensorRT logger that keeps the error lines of the current build (a failed build reports the
    first: TensorRT's own reason) and forwards every message up to `level` as a log event (None:
    none). TensorRT's stock Logger prints to stdout, which carries our JSON lines: its messages were lost."""
    forward = SEVERITIES.index(level) if level else -1
    errors = SEVERITIES.index("ERROR")

    class Recorder(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            rank = SEVERITIES.index(severity.name) if severity.name in SEVERITIES else len(SEVERITIES)
            if rank <= errors:
                self.errors.append(msg)
            if rank <= forward:
                emit({"event": "log", "severity": severity.name, "message": msg})

        def first_error(self) -> str:
            lines = [ln.strip() for msg in self.errors for ln in msg.splitlines() if ln.strip()]
            return lines[0] if lines else "TensorRT logged no error"

    return Recorder()


def allow_decomposed_attention(trt, network) -> int:
    """Let TensorRT decompose the float32 attention layers (ONNX `Attention` nodes) of `network`;
    returns how many it has.

    TensorRT-RTX 1.7 builds an `Attention` node as one fused flash-style kernel in float16 and
    bfloat16, so the (batch, heads, seq, total) scores never exist; the half-precision layers stay
    non-decomposable, so a build that could not fuse them fails (with TensorRT's reason) instead of
    silently materialising the scores. It has no fused kernel for float32 and refuses the build unless
    the layer may be decomposed into MatMul/Softmax/MatMul; the float32 recipe caps its context
    (rtx4090-fp32: 8192 positions) so that this stays small."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer
            n += 1
            if layer.attention.get_input(0).dtype == trt.float32:
                layer.attention.decomposable = True
    return n


def _child_main() -> int:
    """Entry point of the worker process: a JSON job on stdin, JSON lines on stdout."""
    job = json.loads(sys.stdin.read())
    out = sys.stdout

    def emit(ev):
        out.write(json.dumps(ev) + "\n")
        out.flush()
    # TensorRT's log reaches the parent as log events (_log_recorder); stdout carries only JSON lines
    # and what the TensorRT libraries print themselves.
    try:
        emit({"event": "result", "result": _Worker(job, emit).run()})
    except DualbrainError as e:
        emit({"event": "error", "message": str(e)})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
