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
    kv_past = ("batch", spec.num_kv_heads, "past", spec.head_dim)
    kv_total = ("batch", spec.num_kv_heads, "total", spec.head_dim)
    states = (StateInfo("past_key", "present_key", dtype, kv_past),
              StateInfo("past_value", "present_value", dtype, kv_past))
    ins = (hidden, mask, TensorInfo("position_ids", "int64", ("batch", "seq")),
           TensorInfo("past_key", dtype, kv_past), TensorInfo("past_value", dtype, kv_past))
    outs = (hidden_out, TensorInfo("present_key", dtype, kv_total), TensorInfo("present_value", dtype, kv_total))
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


def export_block(module, spec: ModelSpec, kind: str, dtype: str, window: bool, path: Path) -> int:
    import torch

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    ins, outs, _ = block_io(spec, kind, dtype, window)
    args = _example_inputs(spec, ins)
    dyn = tuple({i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)} for t in ins)
    if kind not in ("embed", "head"):   # DecoderLayer.forward(hidden, attention_mask, *state)
        dyn = (dyn[0], dyn[1], dyn[2:])
    with torch.no_grad():
        prog = torch.onnx.export(
            module, args, dynamo=True, input_names=[t.name for t in ins], output_names=[t.name for t in outs],
            # optimize=False: onnxscript's rewriter keeps the last matched graph (and so this block's
            # weights) alive, doubling peak memory on big models; ONNX Runtime optimizes at load anyway
            dynamic_shapes=dyn, verbose=False, optimize=False,
        )
    prog.save(str(path), external_data=True)
    del prog
    return attach_functions(path)


def estimate_output_bytes(ckpt: Checkpoint, dtype: str) -> int:
    s = ckpt.spec
    params = 2 * s.vocab_size * s.hidden_size + s.hidden_size
    params += sum(s.layer_param_count(i) for i in range(s.num_layers))
    return params * DTYPES[dtype]


def _resume_key(root: Path, ckpt: Checkpoint, dtype: str, window: bool, max_context: int) -> str:
    """What an interrupted export must share with this one for its finished blocks to be reused."""
    from dualbrain import __version__

    h = hashlib.sha256()
    h.update(json.dumps([__version__, str(root.resolve()), dtype, window, max_context]).encode())
    h.update((root / "config.json").read_bytes())
    for f in ckpt.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", window: bool = False,
                      max_context: int | None = None, linked: bool = True,
                      progress: Callable[[str, int, int], None] | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """Export `checkpoint` to `out`; returns `out`. Raises DualbrainError on bad input.

    Resumable: after an interruption, `OUT.partial/` keeps the finished blocks, and the same
    command reuses those whose files still match their recorded sha256.
    """
    import torch

    if dtype not in DTYPES:
        raise DualbrainError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
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
    with resumable_output_dir(out, _resume_key(root, ckpt, dtype, window, max_context)) as (part, journal):
        reused = 0
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
                export_block(module, spec, kind, dtype, window, part / f"{name}.onnx")
                del module
                gc.collect()
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
                       blocks=tuple(blocks), files={})
        linked_file = link_blocks(part, man) if linked else None
        files = {p.name: file_digest(p) for p in sorted(part.iterdir())
                 if p.is_file() and p.name not in (JOURNAL, MANIFEST)}
        man = Manifest(model=spec.to_json(), dtype=dtype, opset=opset, max_context=max_context, window=window,
                       blocks=tuple(blocks), files=files, tokenizer_files=tuple(tok_files), linked=linked_file,
                       source={"checkpoint": str(root.resolve()), "checkpoint_dtype": ckpt.dtype,
                               "torch": torch.__version__})
        man.write(part)
        if progress:
            progress("done", len(names), len(names))
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
