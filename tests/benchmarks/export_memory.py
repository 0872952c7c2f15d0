"""Benchmark: the checkpoint -> ONNX export is streamed block by block (peak memory ~ one block).

Requirement: a checkpoint of two full-width Qwen3.6-35B-A3B layers (one linear_attention, one
full_attention; hidden 2048, 256 experts, bf16, stacked experts) exports to bf16 with a peak RSS
below the largest block's size in bf16 + 1.5 GiB.

    python tests/benchmarks/export_memory.py [--workdir /tmp/dualbrain-mem] [--keep] [--profile]

1. Writes the checkpoint (config.json in the published Qwen3.6-35B-A3B layout, one bf16 safetensors
   shard per block + model.safetensors.index.json) in a subprocess, streaming random values chunk
   by chunk, so neither this process nor the writer holds the model. With --keep an existing
   checkpoint in WORKDIR is reused and WORKDIR is left in place; without it WORKDIR is removed.
2. Runs `export_checkpoint(..., dtype="bfloat16")` in a subprocess; polls the RSS of its process
   tree every 50 ms (attributed to the block named by the progress callback) and reads the kernel's
   peak RSS of that child (`wait4` rusage ru_maxrss, i.e. RUSAGE_CHILDREN for that one child).
3. Prints one JSON line (last line of stdout) and exits 0 when peak RSS <= largest block + 1.5 GiB,
   1 when over budget, 2 when the export fails.

--profile additionally runs the export a second time with the exporter's steps wrapped (loading
tensors, building the module incl. interleave_gate_up, torch.onnx.export, ONNXProgram.save,
attach_functions, gc) and reports the exact peak RSS of each step of each block, using the kernel's
high-water mark reset (`echo 5 > /proc/self/clear_refs`). Diagnostic only; not part of the verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1 << 30
ALLOWANCE = int(1.5 * GIB)
PREFIX = "model.language_model."

TEXT_CONFIG = {
    "model_type": "qwen3_5_moe_text",
    "hidden_size": 2048,
    "num_hidden_layers": 2,
    "layer_types": ["linear_attention", "full_attention"],
    "full_attention_interval": 4,
    "vocab_size": 248320,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_output_gate": True,
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "use_cache": True,
    "dtype": "bfloat16",
    "bos_token_id": None,
    "eos_token_id": 248044,
    "pad_token_id": None,
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
}
CONFIG = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "text_config": TEXT_CONFIG,
    "vision_config": {
        "model_type": "qwen3_5_moe_vision",
        "depth": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "deepstack_visual_indexes": [],
    },
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
    "tie_word_embeddings": False,
    "transformers_version": "4.57.0.dev0",
}


# ---------------------------------------------------------------------------------------------------
# block layout (shared by the writer and the budget computation)
# ---------------------------------------------------------------------------------------------------
def _spec(ckpt_dir: Path | None = None):
    from dualbrain.runtime.spec import ModelSpec

    if ckpt_dir is not None:
        return ModelSpec.from_dir(ckpt_dir)
    return ModelSpec.from_config(CONFIG)


def block_tensors(spec) -> dict[str, dict[str, tuple[int, ...]]]:
    """block name -> {full tensor name: shape}, in export order; the same blocks the exporter uses."""
    from dualbrain.exporter.checkpoint import expected_layer_shapes

    h, v = spec.hidden_size, spec.vocab_size
    blocks = {"embed": {PREFIX + "embed_tokens.weight": (v, h)}}
    for i in range(spec.num_layers):
        blocks[f"layer_{i:03d}"] = {f"{PREFIX}layers.{i}.{n}": tuple(s) for n, s in expected_layer_shapes(spec, i).items()}
    blocks["head"] = {PREFIX + "norm.weight": (h,), "lm_head.weight": (v, h)}
    return blocks


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def block_bytes(spec, bytes_per_elem: int = 2) -> dict[str, int]:
    return {b: sum(numel(s) for s in t.values()) * bytes_per_elem for b, t in block_tensors(spec).items()}


# ---------------------------------------------------------------------------------------------------
# checkpoint writer (runs in its own subprocess: `export_memory.py --_write DIR`)
# ---------------------------------------------------------------------------------------------------
CHUNK = 1 << 25   # elements generated at a time (128 MiB float32, 64 MiB bf16)


def _fill(name: str, shape: tuple[int, ...], out, gen) -> None:
    """Stream `numel(shape)` bf16 values of a sane scale for tensor `name` into file `out`."""
    import torch

    n = numel(shape)
    if name.endswith("A_log"):
        vals = torch.empty(n).uniform_(0, 16, generator=gen).clamp_min(1).log()
        out.write(vals.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    if name.endswith("dt_bias"):
        out.write(torch.ones(n, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    done = 0
    while done < n:
        k = min(CHUNK, n - done)
        vals = torch.randn(k, generator=gen).mul_(0.02).to(torch.bfloat16)   # norms: zero-centred (1 + w)
        out.write(vals.view(torch.int16).numpy().tobytes())
        done += k


def write_checkpoint(ckpt: Path) -> None:
    import torch

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tmp = ckpt.with_name(ckpt.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": [248046, 248044]}) + "\n")
    spec = _spec(tmp)
    blocks = block_tensors(spec)
    weight_map, total = {}, 0
    for k, (block, tensors) in enumerate(blocks.items()):
        fname = f"model-{k + 1:05d}-of-{len(blocks):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors.items():
            size = numel(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + size]}
            off += size
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape in tensors.items():
                _fill(name, shape, f, gen)
        assert (tmp / fname).stat().st_size == 8 + len(raw) + off, fname
        total += off
        print(f"  wrote {fname} ({block}: {off / GIB:.2f} GiB)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / ".complete").write_text(json.dumps(CONFIG, sort_keys=True))
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)


def checkpoint_ready(ckpt: Path) -> bool:
    marker = ckpt / ".complete"
    return marker.is_file() and marker.read_text() == json.dumps(CONFIG, sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# the measured export (child process)
# ---------------------------------------------------------------------------------------------------
CHILD_COMMON = r"""
import json, os, sys, time
EV = os.fdopen(int(sys.argv[1]), "w", buffering=1)
CKPT, OUT = sys.argv[2], sys.argv[3]

def status():
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                d[k] = int(v.split()[0]) * 1024
    return d

def emit(**kw):
    EV.write(json.dumps(dict(t=time.time(), **kw, **status())) + "\n")
"""

CHILD_PLAIN = CHILD_COMMON + r"""
emit(block="start")
from dualbrain.exporter.export import export_checkpoint
emit(block="imported")
def progress(name, step, total):
    emit(block=name)
export_checkpoint(CKPT, OUT, dtype="bfloat16", progress=progress)
emit(block="exit")
"""

CHILD_PROFILE = CHILD_COMMON + r"""
import gc as _gc
def clear_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

STACK = ["other"]
BLOCK = ["startup"]
def boundary():
    # close the running segment: its peak belongs to the innermost active step
    emit(kind="segment", block=BLOCK[0], step="/".join(STACK))
    clear_hwm()

def wrap(label, fn):
    def wrapped(*a, **k):
        boundary()
        STACK.append(label)
        before = status()["VmRSS"]
        try:
            return fn(*a, **k)
        finally:
            after = status()["VmRSS"]
            boundary()
            STACK.pop()
            emit(kind="call", block=BLOCK[0], step=label, before=before, after=after)
    return wrapped

import torch
import torch.onnx
import dualbrain.exporter.export as ex
import dualbrain.exporter.blocks.layers as L
from dualbrain.exporter.checkpoint import Checkpoint
for m in ("embed_weight", "head_weights", "layer_weights"):
    setattr(Checkpoint, m, wrap("load", getattr(Checkpoint, m)))
for cls in (L.Embedding, L.Head, L.DecoderLayer):
    cls.__init__ = wrap("build_module", cls.__init__)
L.interleave_gate_up_ = wrap("interleave_gate_up", L.interleave_gate_up_)
torch.onnx.export = wrap("torch.onnx.export", torch.onnx.export)
torch.export.export = wrap("torch.export.export", torch.export.export)
torch.onnx.ONNXProgram.save = wrap("ONNXProgram.save", torch.onnx.ONNXProgram.save)
ex.attach_functions = wrap("attach_functions", ex.attach_functions)
class _GC:
    collect = staticmethod(wrap("gc.collect", _gc.collect))
ex.gc = _GC
def progress(name, step, total):
    boundary()
    BLOCK[0] = name
ex.export_checkpoint(CKPT, OUT, dtype="bfloat16", progress=progress)
boundary()
"""


def _tree_rss(root_pid: int) -> dict[str, int]:
    import psutil

    tot = {"rss": 0, "anon": 0, "file": 0}
    try:
        procs = [psutil.Process(root_pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return tot
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k == "VmRSS":
                        tot["rss"] += int(v.split()[0]) * 1024
                    elif k == "RssAnon":
                        tot["anon"] += int(v.split()[0]) * 1024
                    elif k == "RssFile":
                        tot["file"] += int(v.split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return tot


def run_child(code: str, ckpt: Path, out: Path, poll: float = 0.05):
    """Run `code` in a child; return (returncode, ru_maxrss bytes, seconds, events, samples, stderr tail)."""
    r, w = os.pipe()
    err_path = out.with_name(out.name + ".stderr")
    with open(err_path, "wb") as err:
        t0 = time.time()
        p = subprocess.Popen([sys.executable, "-c", code, str(w), str(ckpt), str(out)], pass_fds=(w,),
                             stdout=err, stderr=err, close_fds=True)
    os.close(w)
    events: list[dict] = []

    def reader():
        with os.fdopen(r) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    samples = []   # (t, block, rss, anon, file)
    status, ru = None, None
    while True:
        pid, st, usage = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            status, ru = st, usage
            break
        s = _tree_rss(p.pid)
        block = next((e["block"] for e in reversed(events) if "kind" not in e), "startup")
        samples.append((time.time() - t0, block, s["rss"], s["anon"], s["file"]))
        time.sleep(poll)
    secs = time.time() - t0
    th.join(timeout=5)
    p.returncode = os.waitstatus_to_exitcode(status)
    tail = err_path.read_text(errors="replace")[-4000:]
    err_path.unlink(missing_ok=True)
    return p.returncode, ru.ru_maxrss * 1024, secs, events, samples, tail


def per_block(events: list[dict], samples: list[tuple]) -> list[dict]:
    order, stats = [], {}
    for _, block, rss, anon, file in samples:
        if block not in stats:
            order.append(block)
            stats[block] = {"block": block, "poll_peak_rss": 0, "anon_at_peak": 0, "file_at_peak": 0, "seconds": 0.0}
        st = stats[block]
        if rss > st["poll_peak_rss"]:
            st.update(poll_peak_rss=rss, anon_at_peak=anon, file_at_peak=file)
    marks = [e for e in events if "kind" not in e]
    for a, b in zip(marks, marks[1:]):
        if a["block"] in stats:
            stats[a["block"]]["seconds"] = round(b["t"] - a["t"], 2)
            # kernel high-water mark when the block ended (monotone over the whole run)
            stats[a["block"]]["hwm_at_end"] = b["VmHWM"]
            stats[a["block"]]["rss_at_end"] = b["VmRSS"]
    return [stats[b] for b in order]


def profile_table(events: list[dict]) -> list[dict]:
    """Exact peak RSS (kernel HWM, reset at every step boundary) per (block, step)."""
    rows: dict[tuple[str, str], dict] = {}
    for e in events:
        if e.get("kind") == "segment":
            key = (e["block"], e["step"])
            row = rows.setdefault(key, {"block": e["block"], "step": e["step"], "peak_rss": 0})
            row["peak_rss"] = max(row["peak_rss"], e["VmHWM"])
        elif e.get("kind") == "call":
            for key, row in rows.items():
                if key[0] == e["block"] and key[1].split("/")[-1] == e["step"]:
                    row.setdefault("rss_before", e["before"])
                    row["rss_after"] = e["after"]
    return list(rows.values())


def fmt(n: int) -> str:
    return f"{n / GIB:6.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/dualbrain-mem", type=Path)
    ap.add_argument("--keep", action="store_true", help="reuse an existing checkpoint and keep WORKDIR afterwards")
    ap.add_argument("--profile", action="store_true", help="also run a per-step profile of the export")
    ap.add_argument("--_write", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._write:
        write_checkpoint(args._write)
        return 0

    work: Path = args.workdir
    ckpt, out = work / "checkpoint", work / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.keep and checkpoint_ready(ckpt):
            print(f"reusing checkpoint {ckpt}", file=sys.stderr)
        else:
            print(f"writing checkpoint to {ckpt} ...", file=sys.stderr, flush=True)
            t = time.time()
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_write", str(ckpt)], check=True)
            print(f"  done in {time.time() - t:.0f} s", file=sys.stderr)

        spec = _spec(ckpt)
        sizes = block_bytes(spec, 2)
        largest = max(sizes, key=sizes.get)
        budget = sizes[largest] + ALLOWANCE
        print("block sizes (bf16): " + ", ".join(f"{b} {fmt(n).strip()}" for b, n in sizes.items()), file=sys.stderr)

        shutil.rmtree(out, ignore_errors=True)
        print("exporting (bfloat16) ...", file=sys.stderr, flush=True)
        rc, ru_max, secs, events, samples, tail = run_child(CHILD_PLAIN, ckpt, out)
        poll_peak = max((s[2] for s in samples), default=0)
        rows = per_block(events, samples)
        print(f"{'block':10} {'poll peak':>11} {'anon@peak':>11} {'file@peak':>11} {'HWM@end':>11} {'RSS@end':>11}  secs",
              file=sys.stderr)
        for r in rows:
            print(f"{r['block']:10} {fmt(r['poll_peak_rss'])} {fmt(r['anon_at_peak'])} {fmt(r['file_at_peak'])} "
                  f"{fmt(r.get('hwm_at_end', 0))} {fmt(r.get('rss_at_end', 0))}  {r['seconds']}", file=sys.stderr)
        if rc != 0:
            print(tail, file=sys.stderr)

        peak = max(poll_peak, ru_max)
        result = {
            "largest_block": largest,
            "largest_block_bytes": sizes[largest],
            "peak_rss_bytes": peak,
            "peak_rss_poll_bytes": poll_peak,
            "peak_rss_ru_maxrss_bytes": ru_max,
            "budget_bytes": budget,
            "ok": rc == 0 and peak <= budget,
            "export_ok": rc == 0,
            "export_seconds": round(secs, 1),
            "block_bytes": sizes,
            "per_block_peak_rss_bytes": {r["block"]: r["poll_peak_rss"] for r in rows},
        }

        if args.profile:
            shutil.rmtree(out, ignore_errors=True)
            print("profiling the export step by step ...", file=sys.stderr, flush=True)
            prc, _, _, pev, _, ptail = run_child(CHILD_PROFILE, ckpt, out)
            print(f"{'block':10} {'step':48} {'peak':>11} {'before':>11} {'after':>11}", file=sys.stderr)
            for row in profile_table(pev):
                print(f"{row['block']:10} {row['step']:48} {fmt(row['peak_rss'])} "
                      f"{fmt(row.get('rss_before', 0))} {fmt(row.get('rss_after', 0))}", file=sys.stderr)
            if prc != 0:
                print(ptail, file=sys.stderr)
        print(json.dumps(result))
        if rc != 0:
            return 2
        return 0 if result["ok"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
