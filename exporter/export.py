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
import shutil
import warnings
from pathlib import Path
from typing import Callable

from dualbrain.artifacts import JOURNAL, resumable_output_dir
from dualbrain.errors import DualbrainError
from dualbrain.exporter.checkpoint import Checkpoint
from dualbrain.exporter.link import link_blocks
from dualbrain.exporter.spec import LINEAR, ModelSpec
from dualbrain.runtime.manifest import (
    MANIFEST, BlockInfo, Manifest, StateInfo, TensorInfo, file_digest,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def block_io(spec: ModelSpec, kind: str, dtype: str, window: bool):
    """(inputs, outputs, state) of a block as manifest entries; the single source of block signatures."""
    h = spec.hidden_size
    hidden = TensorInfo("hidden", dtype, ("batch", "seq", h))
    hidden_out = TensorInfo("hidden_out", dtype, ("batch", "seq", h))
    mask = TensorInfo("attention_mask", "int64", ("batch", "total"))
    if kind == "embed":
        return (TensorInfo("input_ids", "int64", ("batch", "seq")),), (hidden,), ()
    if kind == "head":
        return (hidden,), (TensorInfo("logits", "float32", ("batch", "seq", spec.vocab_size)),), ()
    if kind == LINEAR:
        k1 = spec.linear_conv_kernel - 1
        rec_shape = ("batch", spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_value_head_dim)
        states = (
            StateInfo("conv_state", "conv_state_out", dtype, ("batch", spec.conv_dim, k1),
                      "conv_states" if window else None),
            StateInfo("recurrent_state", "recurrent_state_out", "float32", rec_shape,
                      "recurrent_states" if window else None),
        )
        ins = (hidden, mask) + tuple(TensorInfo(s.input, s.dtype, s.shape) for s in states)
        outs = (hidden_out,) + tuple(TensorInfo(s.output, s.dtype, s.shape) for s in states)
        if window:
            outs += (TensorInfo("conv_states", dtype, ("batch", "seq", spec.conv_dim, k1)),
                     TensorInfo("recurrent_states", "float32", ("batch", "seq") + rec_shape[1:]))
        return ins, outs, states
    # K/V sequence-major, and only this call's positions out: the runtime appends them to its cache
    # (runtime.state), so a step never copies or reallocates the whole past.
    kv_past = ("past", "batch", spec.num_kv_heads, spec.head_dim)
    kv_new = ("seq", "batch", spec.num_kv_heads, spec.head_dim)
    states = (StateInfo("past_key", "new_key", dtype, kv_past, append=True),
              StateInfo("past_value", "new_value", dtype, kv_past, append=True))
    ins = (hidden, mask, TensorInfo("position_ids", "int64", ("batch", "seq")),
           TensorInfo("past_key", dtype, kv_past), TensorInfo("past_value", dtype, kv_past))
    outs = (hidden_out, TensorInfo("new_key", dtype, kv_new), TensorInfo("new_value", dtype, kv_new))
    return ins, outs, states


def _example_inputs(spec: ModelSpec, ins: tuple[TensorInfo, ...]):
    """Example tensors for tracing: batch 2, seq 3, past 2 (distinct sizes so dims stay separate)."""
    import torch

    sizes = {"batch": 2, "seq": 3, "past": 2, "total": 5}
    out = []
    for t in ins:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "input_ids":
            out.append(torch.randint(0, spec.vocab_size, shape))
        elif t.name == "attention_mask":
            out.append(torch.ones(shape, dtype=torch.int64))
        elif t.name == "position_ids":
            out.append(torch.arange(2, 5).repeat(2, 1))
        else:
            out.append(torch.randn(shape).to(_torch_dtype(t.dtype)))
    return tuple(out)


def attach_functions(path: Path) -> int:
    """Add the custom ops' ONNX functions (and their opset imports) to the graph at `path`."""
    import onnx

    from dualbrain.plugins import all_onnx_functions

    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    used = {(n.domain, n.op_type) for n in model.graph.node}
    fns = [f for f in all_onnx_functions(opset) if (f.domain, f.name) in used]
    model.functions.extend(fns)
    have = {o.domain for o in model.opset_import}
    for f in fns:
        for imp in f.opset_import:
            if imp.domain not in have:
                model.opset_import.append(onnx.helper.make_opsetid(imp.domain, imp.version))
                have.add(imp.domain)
    onnx.save(model, str(path))
    return opset


def export_block(module, spec: ModelSpec, kind: str, dtype: str, window: bool, path: Path,
                 opset: int | None = None) -> int:
    """Export one block to `path` (+ `path`.data); `opset` = default-domain opset (None: torch's)."""
    import torch

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    ins, outs, _ = block_io(spec, kind, dtype, window)
    args = _example_inputs(spec, ins)
    dyn = tuple({i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)} for t in ins)
    if kind not in ("embed", "head"):   # DecoderLayer.forward(hidden, attention_mask, *state)
        dyn = (dyn[0], dyn[1], dyn[2:])
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pytree deprecation, raised inside torch.export once per block: noise to a user
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        prog = torch.onnx.export(
            module, args, dynamo=True, input_names=[t.name for t in ins], output_names=[t.name for t in outs],
            # optimize=False: onnxscript's rewriter keeps the last matched graph (and so this block's
            # weights) alive, doubling peak memory on big models. Constant folding alone (below) is
            # what TensorRT needs (static ReduceMean axes, Split instead of SplitToSequence).
            dynamic_shapes=dyn, verbose=False, optimize=False,
            **({"opset_version": opset} if opset is not None else {}),
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
    onnx_dtype = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
                  torch.bfloat16: onnx.TensorProto.BFLOAT16}
    if set(params) - set(inits) or any(tuple(inits[k].dims) != tuple(v.shape)
                                       or inits[k].data_type != onnx_dtype.get(v.dtype) for k, v in params.items()):
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
            pad = (-out.tell()) % 64
            out.write(b"\0" * pad)
            offset = out.tell()
            out.write(raw)
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
    onnx.save(model, str(path))
    return True


def estimate_output_bytes(ckpt: Checkpoint, dtype: str) -> int:
    s = ckpt.spec
    params = 2 * s.vocab_size * s.hidden_size + s.hidden_size
    params += sum(s.layer_param_count(i) for i in range(s.num_layers))
    return params * DTYPES[dtype]


def _resume_key(root: Path, ckpt: Checkpoint, dtype: str, window: bool, max_context: int,
                quant: str | None = None) -> str:
    """What an interrupted export must share with this one for its finished blocks to be reused."""
    from dualbrain import __version__

    h = hashlib.sha256()
    h.update(json.dumps([__version__, str(root.resolve()), dtype, window, max_context]
                        + ([quant] if quant else [])).encode())
    h.update((root / "config.json").read_bytes())
    for f in ckpt.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", window: bool = False,
                      max_context: int | None = None, linked: bool = True, quant: str | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """Export `checkpoint` to `out`; returns `out`. Raises DualbrainError on bad input.

    Resumable: after an interruption, `OUT.partial/` keeps the finished blocks, and the same
    command reuses those whose files still match their recorded sha256.

    `quant="int4-weight-only"` quantizes every block's linear weights after export (see
    `exporter.quantize`; needs dtype float16 or bfloat16; the graphs use opset 21).
    """
    import torch

    from dualbrain.exporter.quantize import MIN_OPSET, QUANT_MODES, quantize_block

    if dtype not in DTYPES:
        raise DualbrainError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if quant is not None and quant not in QUANT_MODES:
        raise DualbrainError(f"unknown quantization {quant!r} (choose from {', '.join(QUANT_MODES)})")
    if quant is not None and dtype == "float32":
        raise DualbrainError(f"--quant {quant} needs --dtype float16 or bfloat16: int4 weight-only is a GPU "
                             "fp16/bf16 format (its scales and activations are in the export dtype)")
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
    tdt = _torch_dtype(dtype)
    from dualbrain.exporter.blocks.layers import DecoderLayer, Embedding, Head

    names = ["embed"] + [f"layer_{i:03d}" for i in range(spec.num_layers)] + ["head"]
    blocks: list[BlockInfo] = []
    with resumable_output_dir(out, _resume_key(root, ckpt, dtype, window, max_context, quant)) as (part, journal):
        reused = 0
        traced: dict[str, Path] = {}   # layer kind -> the first traced graph of that kind
        for step, name in enumerate(names):
            if progress:
                progress(name, step, len(names))
            layer = None if name in ("embed", "head") else step - 1
            kind = name if layer is None else spec.layer_types[layer]
            if journal.finished(name) is not None:
                reused += 1
            else:
                if name == "embed":
                    module = Embedding(ckpt.embed_weight(tdt))
                elif name == "head":
                    module = Head(spec, ckpt.head_weights(tdt))
                else:
                    module = DecoderLayer(spec, layer, ckpt.layer_weights(layer, tdt), window=window)
                ckpt.close()  # drop file handles: nothing from this shard stays resident
                module.eval()
                path = part / f"{name}.onnx"
                if not (kind in traced and reweight_block(traced[kind], module, path)):
                    export_block(module, spec, kind, dtype, window, path, opset=MIN_OPSET if quant else None)
                    traced[kind] = path
                del module
                gc.collect()
                if quant:
                    quantize_block(part / f"{name}.onnx", quant)
                journal.record(name, {f: file_digest(part / f) for f in (f"{name}.onnx", f"{name}.onnx.data")
                                      if (part / f).is_file()})
            ins, outs, state = block_io(spec, kind, dtype, window)
            blocks.append(BlockInfo(name=name, kind=kind, file=f"{name}.onnx", inputs=ins, outputs=outs,
                                    layer=layer, state=state))
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
        man = Manifest(model=spec.to_json(), dtype=dtype, opset=opset, max_context=max_context, window=window,
                       blocks=tuple(blocks), files={}, quant=quant)
        linked_file = link_blocks(part, man) if linked else None
        # block files were hashed when their block finished (journal); hash only the rest
        hashed = {f: d for piece in journal.done.values() for f, d in piece.items()}
        files = {p.name: hashed.get(p.name) or file_digest(p) for p in sorted(part.iterdir())
                 if p.is_file() and p.name not in (JOURNAL, MANIFEST)}
        man = Manifest(model=spec.to_json(), dtype=dtype, opset=opset, max_context=max_context, window=window,
                       blocks=tuple(blocks), files=files, tokenizer_files=tuple(tok_files), linked=linked_file,
                       quant=quant,
                       source={"checkpoint": str(root.resolve()), "checkpoint_dtype": ckpt.dtype,
                               "torch": torch.__version__})
        man.write(part)
        if progress:
            progress("done", len(names), len(names))
    return out
