"""Checkpoint -> one ONNX graph per block (+ manifest), streamed block by block.

Each block is a small torch module (`exporter.blocks`) traced with `torch.onnx.export(dynamo=True)`;
the custom ops become single `dualbrain::` nodes and their ONNX functions are attached to the
graph so ONNX Runtime can run it. Weights go to external data beside each graph. Everything is
written into `OUT.partial/` and renamed to `OUT` only at the end.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from dualbrain.artifacts import JOURNAL, resumable_output_dir
from dualbrain.errors import DualbrainError
from dualbrain.exporter.checkpoint import Checkpoint, expected_layer_shapes, layer_shapes, mtp_shapes
from dualbrain.exporter.link import link_blocks
from dualbrain.runtime.blocks import KINDS, MTP, BlockKind, PlannedBlock, TensorInfo, model_blocks, random_feeds
from dualbrain.runtime.dtypes import FLOAT_DTYPES, QUANT_BLOCKS, dtype as dtype_info, from_torch, quant_mode, torch_dtype
from dualbrain.exporter.window import write_window_variant
from dualbrain.runtime.manifest import MANIFEST, BlockInfo, Manifest, file_digest
from dualbrain.runtime.manifest import VERSION as MANIFEST_VERSION
from dualbrain.runtime.spec import FULL, ModelSpec

# Every block is exported at one default-domain opset, so the linked graph's nodes keep their meaning:
# 23 for the full-attention blocks' `Attention` node (exporter.blocks.layers), which also covers the
# int4 quantizer's blockwise DequantizeLinear (quantize.MIN_OPSET, 21).
EXPORT_OPSET = 23

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _example_inputs(spec: ModelSpec, ins: tuple[TensorInfo, ...]):
    """Example tensors for tracing: batch 2, seq 3, past 2 (distinct sizes so dims stay separate)."""
    import torch

    feeds = random_feeds(ins, spec.vocab_size, batch=2, seq=3, past=2, float_dtype=lambda _: np.float32)
    return tuple(torch.from_numpy(feeds[t.name]).to(torch_dtype(t.dtype)) for t in ins)


def _dynamic_shapes(module, ins: tuple[TensorInfo, ...]):
    """torch.export dynamic dims per input, grouped as the module's forward takes them (a trailing
    *args parameter takes the rest as one tuple)."""
    import inspect

    import torch

    dyn = tuple({i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)} for t in ins)
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        return (*dyn[:len(params) - 1], dyn[len(params) - 1:])
    return dyn


def attach_functions(path: Path) -> int:
    """Add the custom ops' ONNX functions used by the graph at `path`; returns its default opset."""
    import onnx

    from dualbrain.plugins import attach_functions as attach

    model = onnx.load(str(path), load_external_data=False)
    opset = attach(model, used_only=True)
    onnx.save(model, str(path))
    return opset


def export_block(module, spec: ModelSpec, kind: BlockKind, dtype: str, path: Path,
                 opset: int = EXPORT_OPSET) -> int:
    """Export one block to `path` (+ `path`.data); `opset` = default-domain opset."""
    import torch

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    sig = kind.signature(spec, dtype)
    ins, outs = sig.inputs, sig.outputs
    args = _example_inputs(spec, ins)
    dyn = _dynamic_shapes(module, ins)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pytree deprecation, raised inside torch.export once per block: noise to a user
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        prog = torch.onnx.export(
            module, args, dynamo=True, input_names=[t.name for t in ins], output_names=[t.name for t in outs],
            # optimize=False: onnxscript's rewriter keeps the last matched graph (and so this block's
            # weights) alive, doubling peak memory on big models. Constant folding alone (below) is
            # what TensorRT needs (static ReduceMean axes, Split instead of SplitToSequence).
            dynamic_shapes=dyn, verbose=False, optimize=False,
            opset_version=opset,
        )
    import onnx_ir
    from onnxscript.optimizer import fold_constants

    # Weights are hidden from the folder: no copies of them, and they keep their parameter names
    # (so later layers of the same kind can be re-weighted instead of traced).
    weights = {name: v.const_value for name, v in prog.model.graph.initializers.items()
               if name in dict(module.named_parameters())}
    for name in weights:
        prog.model.graph.initializers[name].const_value = None
    fold_constants(prog.model)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(prog.model)
    for name, tensor in weights.items():
        prog.model.graph.initializers[name].const_value = tensor
    prog.save(str(path), external_data=True)
    del prog
    return attach_functions(path)


def _point_external(t, entries: dict[str, str]) -> None:
    """Make initializer `t` read its bytes from the external-data `entries` (location, offset, length)."""
    del t.external_data[:]
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)


def _write_external(out, t, raw: bytes, data_name: str) -> None:
    """Append `raw` to the open data file `out` (64-byte aligned) as initializer `t`'s bytes."""
    out.write(b"\0" * ((-out.tell()) % 64))
    _point_external(t, {"location": data_name, "offset": str(out.tell()), "length": str(len(raw))})
    out.write(raw)


def reweight_block(template: Path, module, path: Path) -> bool:
    """Write `path` as a copy of the traced `template` graph with `module`'s weights.

    Decoder layers of one kind share a graph; only their weights differ. Tracing is the slow part
    of an export (seconds per block), so each kind is traced once and later layers are re-weighted.
    Initializers are matched by parameter name and shape; returns False (caller traces instead)
    when they do not match exactly.
    """
    import onnx
    import torch

    model = onnx.load(str(template), load_external_data=False)
    params = {k: v.detach() for k, v in module.named_parameters()}
    inits = {t.name: t for t in model.graph.initializer}
    if set(params) - set(inits) or any(tuple(inits[k].dims) != tuple(v.shape)
                                       or inits[k].data_type != from_torch(v.dtype).onnx for k, v in params.items()):
        return False
    data_name = path.name + ".data"
    src = template.with_name(template.name + ".data")
    with open(path.with_name(data_name), "wb") as out, open(src, "rb") as old:
        for t in model.graph.initializer:
            external = t.data_location == onnx.TensorProto.EXTERNAL
            if not external and t.name not in params:
                continue  # an inline constant of the graph itself
            info = {e.key: e.value for e in t.external_data}
            if t.name in params:  # small parameters may be inline in the template: move them out too
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(f)
                t.data_location = onnx.TensorProto.EXTERNAL
                p = params[t.name].contiguous()
                raw = (p.view(torch.int16) if p.dtype == torch.bfloat16 else p).numpy().tobytes()
            else:  # a constant of the graph itself: identical for every layer of this kind
                old.seek(int(info.get("offset", 0)))
                raw = old.read(int(info["length"]))
            _write_external(out, t, raw, data_name)
    onnx.save(model, str(path))
    return True


def estimate_output_bytes(ckpt: Checkpoint, dtype: str) -> int:
    s = ckpt.spec
    params = 2 * s.vocab_size * s.hidden_size + s.hidden_size
    params += sum(math.prod(shape) for i in range(s.num_layers) for shape in expected_layer_shapes(s, i).values())
    if ckpt.has_mtp:    # its lm_head is the head's
        params += sum(math.prod(shape) for shape in (*layer_shapes(s, FULL).values(), *mtp_shapes(s).values()))
    return params * dtype_info(dtype).itemsize


def share_weight(path: Path, name: str, source: Path, source_name: str) -> bool:
    """Make initializer `name` of the graph at `path` read `source_name`'s bytes from `source`'s data
    file (same directory) when they are the same tensor, and drop its own copy; returns whether it did.

    The MTP head uses the model's lm_head: without this its graph would carry a second copy (about
    1 GB for the 35B model, on disk and in memory)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    src = onnx.load(str(source), load_external_data=False)
    t = next((x for x in model.graph.initializer if x.name == name), None)
    o = next((x for x in src.graph.initializer if x.name == source_name), None)
    ext = onnx.TensorProto.EXTERNAL
    if t is None or o is None or t.data_location != ext or o.data_location != ext \
            or list(t.dims) != list(o.dims) or t.data_type != o.data_type:
        return False
    loc = lambda x: {e.key: e.value for e in x.external_data}  # noqa: E731
    data, src_info = path.with_name(path.name + ".data"), loc(o)
    with open(data, "rb") as f, open(source.with_name(src_info["location"]), "rb") as g:
        mine = loc(t)
        f.seek(int(mine.get("offset", 0)))
        g.seek(int(src_info.get("offset", 0)))
        if f.read(int(mine["length"])) != g.read(int(src_info["length"])):
            return False
    tmp = data.with_name(data.name + ".tmp")
    with open(data, "rb") as old, open(tmp, "wb") as out:
        for x in model.graph.initializer:
            if x.data_location != ext:
                continue
            if x is t:
                _point_external(x, src_info)
            else:
                info = loc(x)
                old.seek(int(info.get("offset", 0)))
                _write_external(out, x, old.read(int(info["length"])), data.name)
    tmp.replace(data)
    onnx.save(model, str(path))
    return True


def _resume_key(root: Path, ckpt: Checkpoint, dtype: str, max_context: int, quant: str | None = None) -> str:
    """What an interrupted export must share with this one for its finished blocks to be reused."""
    from dualbrain import __version__

    h = hashlib.sha256()
    h.update(json.dumps([__version__, MANIFEST_VERSION, EXPORT_OPSET, str(root.resolve()), dtype, max_context]
                        + ([quant] if quant else [])).encode())
    h.update((root / "config.json").read_bytes())
    for f in ckpt.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", window: bool = False,
                      max_context: int | None = None, linked: bool = True, quant: str | None = None,
                      quant_block: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """Export `checkpoint` to `out`; returns `out`. Raises DualbrainError on bad input.

    Resumable: after an interruption, `OUT.partial/` keeps the finished blocks, and the same
    command reuses those whose files still match their recorded sha256.

    `quant` ("int8", "int4", "int4-experts" or "int4-weight-only") quantizes every block but the MTP head after
    export, in blocks of at most `quant_block` (see `exporter.quantize`; "int4-weight-only", the
    TensorRT form, needs dtype float16 or bfloat16).

    Blocks with per-position state always get a window variant beside them (`exporter.window`);
    `window` is accepted for compatibility and changes nothing.
    """
    import torch

    from dualbrain.exporter.quantize import quantize_block

    if dtype not in FLOAT_DTYPES:
        raise DualbrainError(f"unknown dtype {dtype!r} (choose from {', '.join(FLOAT_DTYPES)})")
    if quant is not None:
        qm = quant_mode(quant)
        if dtype not in qm.base_dtypes:
            raise DualbrainError(f"--quant {quant} needs --dtype {' or '.join(qm.base_dtypes)}: it is the TensorRT "
                                 "fp16/bf16 form (its scales and activations are in the export dtype); "
                                 "--quant int4 or int8 go on any dtype")
        quant_block = quant_block or qm.block
        if quant_block not in QUANT_BLOCKS:
            raise DualbrainError(f"--block {quant_block}: choose from {', '.join(map(str, QUANT_BLOCKS))}")
    elif quant_block is not None:
        raise DualbrainError("--block needs --quant")
    root = Path(checkpoint)
    spec = ModelSpec.from_dir(root)
    ckpt = Checkpoint(root, spec)
    ckpt.validate()
    max_context = max_context or spec.max_position_embeddings
    if max_context < 1:
        raise DualbrainError("--max-context must be positive")
    out = Path(out)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    need = estimate_output_bytes(ckpt, dtype)
    if need > free:
        raise DualbrainError(
            f"not enough disk space for the export: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
        )
    tdt = torch_dtype(dtype)
    plan = model_blocks(spec) + ([PlannedBlock(MTP, KINDS[MTP])] if ckpt.has_mtp else [])
    blocks: list[BlockInfo] = []
    key = _resume_key(root, ckpt, dtype, max_context, quant and f"{quant}/{quant_block}")
    with resumable_output_dir(out, key) as (part, journal):
        reused = 0
        traced: dict[str, Path] = {}   # layer kind -> the first traced graph of that kind
        for step, planned in enumerate(plan):
            name, kind, layer = planned.name, planned.kind, planned.layer
            sig = kind.signature(spec, dtype)
            window_file = f"{name}.window.onnx" if sig.window_outputs else None
            if progress:
                progress(name, step, len(plan))
            if journal.finished(name) is not None:
                reused += 1
            else:
                module = kind.torch_module().from_checkpoint(spec, ckpt, layer, tdt)
                ckpt.close()  # drop file handles: nothing from this shard stays resident
                module.eval()
                path = part / f"{name}.onnx"
                if not (kind.name in traced and reweight_block(traced[kind.name], module, path)):
                    export_block(module, spec, kind, dtype, path)
                    traced[kind.name] = path
                del module
                gc.collect()
                for weight, block, source in kind.shares:
                    share_weight(path, weight, part / f"{block}.onnx", source)
                if quant and kind.quantize:
                    quantize_block(part / f"{name}.onnx", quant, quant_block)
                if window_file:
                    write_window_variant(path, part / window_file, sig)
                journal.record(name, {f: file_digest(part / f) for f in (f"{name}.onnx", f"{name}.onnx.data",
                                                                           window_file) if f and (part / f).is_file()})
            blocks.append(BlockInfo(name=name, kind=kind.name, file=f"{name}.onnx", inputs=sig.inputs,
                                    outputs=sig.outputs, layer=layer, state=sig.state,
                                    window_file=window_file, window_outputs=sig.window_outputs))
        if reused and log:
            log(f"resumed {part.name}: reused {reused} finished block(s) whose sha256 still matched")
        ckpt.close()
        tok_files = []
        for f in TOKENIZER_FILES:
            if (root / f).is_file():
                shutil.copyfile(root / f, part / f)
                tok_files.append(f)
        import onnx

        opset = next(o.version for o in onnx.load(str(part / "embed.onnx"), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        man = Manifest(model=spec, dtype=dtype, opset=opset, max_context=max_context, window=True,
                       blocks=tuple(blocks), files={}, quant=quant)
        linked_file = link_blocks(part, man) if linked else None
        linked_window = link_blocks(part, man, window=True) if linked else None
        # block files were hashed when their block finished (journal); hash only the rest
        hashed = {f: d for piece in journal.done.values() for f, d in piece.items()}
        files = {p.name: hashed.get(p.name) or file_digest(p) for p in sorted(part.iterdir())
                 if p.is_file() and p.name not in (JOURNAL, MANIFEST)}
        man = Manifest(model=spec, dtype=dtype, opset=opset, max_context=max_context, window=True,
                       blocks=tuple(blocks), files=files, tokenizer_files=tuple(tok_files), linked=linked_file,
                       linked_window=linked_window,
                       quant=quant, quant_block=quant_block,
                       source={"checkpoint": str(root.resolve()), "checkpoint_dtype": ckpt.dtype,
                               "torch": torch.__version__, "identity": ckpt.identity()})
        man.write(part)
        if progress:
            progress("done", len(plan), len(plan))
    return out


def export_bridges(bridges_dir: str | Path, out: str | Path, *, dtype: str = "float32",
                   progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Export bridges written by `dualbrain align` (runtime/bridges.py): one side block per link,
    `bridge_NNN.onnx` + data, and their `bridges.json` with the dtype and the files' digests."""
    import dataclasses

    import torch

    from dualbrain.artifacts import atomic_output_dir
    from dualbrain.exporter.align import load_bridges
    from dualbrain.runtime.blocks import BRIDGE

    if dtype not in FLOAT_DTYPES:
        raise DualbrainError(f"unknown dtype {dtype!r} (choose from {', '.join(FLOAT_DTYPES)})")
    cfg, bridges = load_bridges(bridges_dir, dtype=torch_dtype(dtype))
    kind = KINDS[BRIDGE]
    names = cfg.block_names()
    with atomic_output_dir(out) as part:
        for i, (name, module) in enumerate(zip(names, bridges)):
            if progress:
                progress(name, i, len(names))
            export_block(module.eval(), cfg.shape, kind, dtype, part / f"{name}.onnx")
        files = {p.name: file_digest(p) for p in sorted(part.iterdir()) if p.is_file()}
        dataclasses.replace(cfg, dtype=dtype, files=files).write(part)
        if progress:
            progress("done", len(names), len(names))
    return Path(out)
