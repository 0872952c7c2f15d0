"""dualbrain's own CPU kernels for ONNX Runtime: built with the system C compiler on first use, cached,
and swapped into the graph at load; the pure-ONNX graph is the fallback wherever they are not available.

The kernels, each beside its op's numpy reference (float32 only; other dtypes keep the ONNX function):

* `plugins/moe_dispatch/cpu.c`: the MoE experts for decode-sized calls. It reads each chosen expert's
  rows once for every token routed to it. It is a GEMV kernel, so a call of more than
  `KERNEL_MAX_TOKENS` tokens (a prefill) keeps ONNX Runtime's GEMM-based `com.microsoft.MoE`: the
  rewrite puts both behind an ONNX `If` on the token count.
* the same file's `Int4MoEDispatch` / `Int8MoEDispatch`: the 4- / 8-bit experts of an int4 / int8 export
  (`KERNEL_BLOCKS`), decode and prefill, in place of ONNX Runtime's QMoE (which dequantizes the chosen
  experts to float32). The weights are laid out at load with eight rows interleaved
  (`moe_dispatch.reference.interleave_int4_rows` / `interleave_int8_rows`), so that each block's scale
  and FMA serve eight rows, and handed to the session without a copy; QMoE's layout is then not loaded.
  Used only where the CPU has AVX-512 VNNI (elsewhere the kernels would be a scalar loop and QMoE stays).
  `Int4SharedMoEDispatch` is Int4MoEDispatch with the layer's int4 shared expert laid out as one more
  expert that every token goes to, in place of the shared expert's own nodes (`_shared_expert`).
* `plugins/causal_conv/cpu.c`: the GDN layers' short depthwise convolution, which ONNX Runtime's `Conv`
  runs as one tiny convolution per channel (25 ms per batch-8 step on the mid-size MoE).
* `plugins/gated_delta/cpu.c`: the GDN recurrence (and its window form, which keeps every position's
  state for speculative rollback). ONNX Runtime's `LinearAttention` took 33-37 ms of a batch-8 decode
  step on the mid-size MoE for what is reading and writing a 16 KB state per head. Where the rule is fed
  as the exporter writes a GDN layer's mixer (CausalConv1d, Split, the q/k/v Reshapes and the q/k l2norms
  as ort_fusions leaves them), the same file's `GatedDeltaMixer` runs all of it and the gated output norm as one
  node, one parallel pass a layer instead of ~20 nodes (`_gated_delta_mixer`); `GatedDeltaMixerRawGates`
  folds the gates' nodes in too (`_gates`: beta's Sigmoid, g's softplus). The shape arithmetic that fed only
  the folded nodes goes with them (`_live`).
* `plugins/cached_attention/cpu.c`: the full-attention layers' `Attention` node as the exporter writes it (over
  Transpose(Concat(past, new)) K and V), reading the runtime's sequence-major cache in place, each K/V row once
  for the query heads that share it, a decode step's keys cut in parts the cores stream side by side
  (`_cached_attention`); where it does not match, the backend splits the node into MatMul/Softmax/MatMul
  (`onnxruntime.split_attention`).
* `plugins/int8_matmul/cpu.c`: the linears of an `--quant int8` export with int16 activations (ONNX
  Runtime's MatMulNBits quantizes them to int8, which costs top-1 agreement with fp32), on the weight
  laid out in MatMulNBits' layout at load; behind the same `If` as the MoE, prefill keeps MatMulNBits.
* `plugins/int4_matmul/cpu.c`: the linears of an `--quant int4` export (`KERNEL_BLOCKS`; the LM head
  included), decode and prefill, in place of MatMulNBits, on the weight laid out at load as
  Int4MoEDispatch's experts are (`int4_matmul.reference.interleave_linear`) and handed over the same
  way, so MatMulNBits' copy is never made. AVX-512 VNNI only, as Int4MoEDispatch. The three share their
  block dot products, `plugins/quant_blocks.h`.

`plugins/ort_kernels.c` registers them under `CPU_DOMAIN`. The library talks to ONNX Runtime through
its C ABI only (`plugins/ort_abi.h`), so it needs no headers and builds with nothing but `cc`.
It is compiled for this machine's CPU (`-march=native`) into ``$DUALBRAIN_CACHE`` (default
``~/.cache/dualbrain``, else the temporary folder) under a name that hashes the sources, the compiler
and the CPU, written to a temporary file and renamed, so a build cut short leaves nothing
half-written. ``DUALBRAIN_CPU_KERNELS=0`` turns the kernels off; no compiler, a failed build or
Windows turn them off with one warning.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dualbrain import plugins
from dualbrain.plugins.cached_attention.reference import OP_TYPE as ATTENTION_OP
from dualbrain.plugins.causal_conv.reference import IDENTITY as CONV
from dualbrain.plugins.gated_delta.reference import IDENTITY as GDN, MIXER_OP_TYPE, MIXER_RAW_OP_TYPE
from dualbrain.plugins.int4_matmul.reference import OP_TYPE as INT4_LINEAR_OP, interleave_linear
from dualbrain.plugins.int8_matmul.reference import OP_TYPE as INT8_OP, to_rows
from dualbrain.plugins.moe_dispatch.reference import (IDENTITY as MOE, INT4_BLOCK, INT4_OP_TYPE, INT8_OP_TYPE,
                                                      INT4_SHARED_OP_TYPE, interleave_int4_rows, interleave_int8_rows,
                                                      interleave_scales)
from dualbrain.runtime.backends.onnxruntime import attention_cache, unread_copies
from dualbrain.runtime.backends.ort_quant import _ONNX, ACCURACY_LEVEL, MS_DOMAIN, QMOE_SWIGLU, _attrs, _Graph

CPU_DOMAIN = "dualbrain.cpu"    # the domain our kernels register under (passed to the C build)
# Calls of at most this many tokens run our MoE and int8 kernels (GEMV-style); longer ones ONNX Runtime's
# GEMMs. Measured on the mid-size MoE's shapes (H 1024, 64 experts of 256, top 8), 2 cores: our MoE is
# faster up to 32 tokens, ONNX Runtime's from ~64.
KERNEL_MAX_TOKENS = 32
ENV_SWITCH = "DUALBRAIN_CPU_KERNELS"

_PLUGINS = Path(plugins.__file__).parent
SOURCES = (_PLUGINS / "ort_kernels.c", _PLUGINS / "quant_layouts.c", *(_PLUGINS / op / "cpu.c" for op in (
    "moe_dispatch", "causal_conv", "int8_matmul", "int4_matmul", "gated_delta", "cached_attention")))
HEADERS = (_PLUGINS / "ort_abi.h", _PLUGINS / "ort_kernel.h", _PLUGINS / "quant_blocks.h", _PLUGINS / "vector_math.h")
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", f"-I{_PLUGINS}",
         f'-DDUALBRAIN_CPU_DOMAIN="{CPU_DOMAIN}"')
ARCH_FLAGS = (("-march=native",), ())   # tried in order: this CPU's vector units, then the compiler's default


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dirs() -> list[Path]:
    """Where the library may be cached, in order: $DUALBRAIN_CACHE (alone, when set), else
    ~/.cache/dualbrain, then the system's temporary folder (a read-only or missing home)."""
    if os.environ.get("DUALBRAIN_CACHE"):
        return [Path(os.environ["DUALBRAIN_CACHE"]) / "kernels"]
    user = getattr(os, "getuid", lambda: "user")()
    return [Path(os.path.expanduser("~")) / ".cache" / "dualbrain" / "kernels",
            Path(tempfile.gettempdir()) / f"dualbrain-{user}" / "kernels"]


def _cpu_id() -> str:
    """What the -march=native code depends on (a cache shared between machines must not mix them)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def compiler() -> str | None:
    """The C compiler the kernels are built with: $CC (default cc), else gcc or clang; None when there is none."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def compile_library(cc: str, out: Path | str, arch: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Build the kernels' library at `out` with `cc` and the CPU flags `arch` (one of ARCH_FLAGS)."""
    cmd = [cc, *FLAGS, *arch, "-o", str(out), *map(str, SOURCES), "-lm"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@functools.cache
def library() -> Path | None:
    """The kernels' shared library, built on first use; None when off or not buildable (one warning)."""
    if not enabled():
        return None
    if sys.platform == "win32":
        return _unavailable("no build for Windows yet")
    cc = compiler()
    if cc is None:
        return _unavailable("no C compiler found (set CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return _unavailable(f"{cc} --version failed: {e}")
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES + HEADERS), version.encode(), _cpu_id().encode(),
                 " ".join(FLAGS).encode()]:
        key.update(part)
    name = f"libdualbrain_cpu-{key.hexdigest()[:16]}.so"
    for folder in cache_dirs():
        if (folder / name).exists():
            return folder / name
    for folder in cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                break
        except OSError:
            pass
    else:
        return _unavailable(f"no writable cache folder ({', '.join(map(str, cache_dirs()))}; set DUALBRAIN_CACHE)")
    out = folder / name
    errors = []
    for arch in ARCH_FLAGS:
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.part")
        os.close(fd)
        try:
            r = compile_library(cc, tmp, arch)
            if r.returncode == 0:
                os.replace(tmp, out)
                return out
            errors.append(r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"])
        except (OSError, subprocess.SubprocessError) as e:
            errors.append([str(e)])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return _unavailable(f"{cc} failed: {errors[-1][0]}")


def _unavailable(why: str) -> None:
    warnings.warn(f"dualbrain CPU kernels off ({why}); ONNX Runtime's own kernels run instead "
                  f"(set {ENV_SWITCH}=0 to silence)", RuntimeWarning, stacklevel=3)
    return None


@functools.cache
def _layouts():
    """The library's relayout functions (plugins/quant_layouts.c) through ctypes; None without the library."""
    lib = library()
    if lib is None:
        return None
    c = ctypes.CDLL(str(lib))
    for name in ("dualbrain_interleave_int4_rows", "dualbrain_interleave_int8_rows", "dualbrain_interleave_linear"):
        fn = getattr(c, name)
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64], None
    return c


def interleave_experts(bits: int, stored: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`moe_dispatch.reference.interleave_int{bits}_rows`, the bytes laid out by the library in one pass
    (numpy's shuffles ran at ~0.4 GB/s); the reference itself where the library is not built."""
    c = _layouts()
    if c is None:
        return (interleave_int4_rows if bits == 4 else interleave_int8_rows)(stored, scales)
    stored = np.ascontiguousarray(stored, np.uint8)
    e, rows, width = stored.shape
    blocks = width * 8 // bits // INT4_BLOCK
    if rows % 8 or width * 8 // bits != blocks * INT4_BLOCK or np.shape(scales) != (e, rows, blocks):
        raise ValueError(f"experts {stored.shape} / scales {np.shape(scales)} do not fit the {bits}-bit layout")
    out = np.empty((e, rows // 8, blocks, 32 * bits), np.uint8)
    getattr(c, f"dualbrain_interleave_int{bits}_rows")(stored.ctypes.data, out.ctypes.data, e * rows // 8, blocks)
    return out, interleave_scales(scales)


def interleave_int4_linear(packed: bytes, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`int4_matmul.reference.interleave_linear`, the bytes laid out by the library (the reference without it)."""
    c = _layouts()
    scale = np.asarray(scale, np.float32)
    blocks, n = scale.shape
    k = blocks * INT4_BLOCK
    if c is None or n % 8 or len(packed) != k * n // 2:
        return interleave_linear(packed, scale)          # the reference: its checks say what is wrong
    src = np.frombuffer(packed, np.uint8)
    out = np.empty((n // 8, blocks, 128), np.uint8)
    c.dualbrain_interleave_linear(src.ctypes.data, out.ctypes.data, k, n)
    return out, interleave_scales(scale.T[None])[0]


class _Rewrite(_Graph):
    """One pass over a main graph: ort_quant's view of it (initializers, producers, users, external
    bytes) plus what these rewrites read and add."""

    def __init__(self, model, model_dir, supplied: dict[str, np.ndarray] | None = None):
        super().__init__(model.graph, model_dir)
        self.floats = {n for n, t in self.inits.items() if t.data_type == TensorProto.FLOAT}
        self.dropped: set[str] = set()       # nodes (by first output) folded into a rewrite
        self.supplied = supplied

    def supply(self, name: str, array: np.ndarray) -> str:
        """A new initializer `name` holding `array`: with a `supplied` dict, a one-element placeholder in the
        graph and the array in the dict, for the session's options to hand over in place
        (`SessionOptions.add_initializer`, which replaces the placeholder; ONNX Runtime checks a
        placeholder's data against its dims, so it cannot be dims alone); else the array in the graph."""
        if self.supplied is None:
            self.add_inits.append(numpy_helper.from_array(array, name))
        else:
            self.supplied[name] = array
            self.add_inits.append(numpy_helper.from_array(np.zeros(1, array.dtype), name))
        return name

    def release(self, *names: str) -> None:
        """The node being rewritten no longer reads `names`: drop those it was the only reader of."""
        self.drop_inits.update(n for n in names if self.users.get(n) == 1 and n not in self.outputs)

    def made(self, value: str, *ops: str, readers: int | None = 1, reads: str | None = None, domains=_ONNX):
        """The node giving `value` when it is one of `ops` (in `domains`), `value` has `readers` readers (None: any
        number) and is not a graph output, and the node reads `reads` first (when given); else None."""
        n = self.producer.get(value)
        if n is None or n.op_type not in ops or n.domain not in domains or value in self.outputs \
                or readers is not None and self.users.get(value, 0) != readers \
                or (reads is not None and n.input[0] != reads):
            return None
        return n

    def branch_output(self, name: str, like: str):
        """A branch's output `name`, typed like value `like` where the graph knows its rank."""
        shape = self.shapes.get(like)
        dims = [None] * len(shape.dim) if shape is not None and shape.dim else None
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _decode_or_prefill(r: _Rewrite, x: str, limit: int, y: str, p: str, ours, theirs) -> list:
    """Nodes giving `y` from `ours` when `x` holds at most `limit` elements (a decode-sized call), else
    from `theirs` (ONNX Runtime's kernel, for prefill): an ONNX If on Size(x). Each branch is its node."""
    branch = lambda n, name: helper.make_graph([n], name, [], [r.branch_output(n.output[0], y)])  # noqa: E731
    return [
        helper.make_node("Size", [x], [f"{p}/size"], name=f"{p}/size"),
        helper.make_node("Constant", [], [f"{p}/limit"], name=f"{p}/limit",
                         value=helper.make_tensor(f"{p}/limit", TensorProto.INT64, [], [limit])),
        helper.make_node("LessOrEqual", [f"{p}/size", f"{p}/limit"], [f"{p}/small"], name=f"{p}/small"),
        helper.make_node("If", [f"{p}/small"], [y], name=f"{p}/if",
                         then_branch=branch(ours, f"{p}/decode"), else_branch=branch(theirs, f"{p}/prefill")),
    ]


def _moe_behind_if(node, r: _Rewrite) -> list | None:
    """MoEDispatch -> If(tokens <= KERNEL_MAX_TOKENS, our kernel, the node as it was)."""
    if len(node.input) != 4 or not {node.input[2], node.input[3]} <= r.floats:
        return None
    x, y = node.input[0], node.output[0]
    p = f"{node.name or y}/cpu_kernel"
    hidden = r.inits[node.input[2]].dims[2]
    ours = helper.make_node(MOE.op_type, list(node.input), [f"{p}/y"], name=f"{p}/moe", domain=CPU_DOMAIN)
    theirs = helper.make_node(MOE.op_type, list(node.input), [f"{p}/y_ort"], name=f"{p}/moe_ort", domain=MOE.domain)
    for n in (ours, theirs):
        n.attribute.extend(node.attribute)
    return _decode_or_prefill(r, x, KERNEL_MAX_TOKENS * hidden, y, p, ours, theirs)


@functools.cache
def _has_vnni() -> bool:
    """The CPU has the AVX-512 VNNI and VL instructions the int4 / int8 kernels are written for."""
    flags = set(_cpu_id().split())
    return {"avx512_vnni", "avx512vl"} <= flags


class _SharedExpert(NamedTuple):
    """The exporter's shared expert beside a MoE node: y = moe + sigmoid(gate_vector(x)) * down(silu(gate(x)) * up(x)).
    Each linear is its node; `nodes` are all of its nodes, `add` (giving y) among them."""
    add: object
    nodes: list
    gate: object
    up: object
    down: object
    gate_vector: object


def _shared_expert(moe, r: _Rewrite) -> _SharedExpert | None:
    """The shared expert summed with `moe`'s output, as `exporter.blocks.layers` writes it, when every value
    in it is read only inside it; else None."""
    x, made = moe.input[0], r.made

    def either(node, first, second):
        """(first(a), second(b)) for `node`'s two inputs a, b in either order, when both match; else None."""
        for a, b in (node.input, node.input[::-1]):
            if len(node.input) == 2 and first(a) is not None and second(b) is not None:
                return first(a), second(b)
        return None

    linear = ("Gemm", "MatMul")
    add = r.only_user(moe.output[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    weighted = made(add.input[1] if add.input[0] == moe.output[0] else add.input[0], "Mul")
    found = weighted and either(weighted, lambda v: made(v, "Sigmoid"), lambda v: made(v, *linear))
    if not found:
        return None
    sigmoid, down = found
    gate_vector = made(sigmoid.input[0], *linear, reads=x)
    act = made(down.input[0], "Mul")

    def silu(v):  # Mul(g, Sigmoid(g)) with g the gate projection of x (read by both)
        m = made(v, "Mul")
        pair = m and either(m, lambda g: made(g, *linear, reads=x, readers=2), lambda s: made(s, "Sigmoid"))
        return (m, pair[1], pair[0]) if pair and pair[1].input[0] == pair[0].output[0] else None

    found = gate_vector and act and either(act, silu, lambda v: made(v, *linear, reads=x))
    if not found:
        return None
    (silu_mul, silu_sigmoid, gate), up = found
    nodes = [gate_vector, sigmoid, gate, silu_sigmoid, silu_mul, up, act, down, weighted, add]
    return _SharedExpert(add, nodes, gate, up, down, gate_vector)


# ort_quant's QMoE activation attributes as `_attrs` reads them back (strings come back as bytes)
_QMOE_SWIGLU_READ = {a: v.encode() if isinstance(v, str) else v for a, v in QMOE_SWIGLU.items()}


_QUANT_MOE = {4: INT4_OP_TYPE, 8: INT8_OP_TYPE}           # expert bits -> our op type
# Weight bits -> the export's block sizes the interleaved kernels take. Their layouts hold a scale per 32
# values, so a larger block's scales are repeated at load (`_per_32`; float16 where the export's are, 16 bytes a
# block of eight rows). That still beats QMoE: int4 in blocks of 64 1.03x at batch 1, 1.12x at batch 8 (peak RSS
# 551 against 571 MiB); int8 in blocks of 128 1.32x and 1.18x (`cpu_kernels.py EXPORT --without QMoE`,
# tests/benchmarks/RESULTS.md, twentieth pass; with float32 scales and an older dot, 1.00x and 0.98x).
KERNEL_BLOCKS = {4: (32, 64, 128), 8: (32, 64, 128)}


def _per_32(scales: np.ndarray, block: int, axis: int) -> np.ndarray:
    """Scales of blocks of `block` values along `axis` -> one per 32 values (each repeated)."""
    return scales if block == INT4_BLOCK else np.repeat(scales, block // INT4_BLOCK, axis=axis)


def _quant_moe(node, r: _Rewrite) -> list | None:
    """QMoE (4- or 8-bit in `KERNEL_BLOCKS`, no biases) -> Int4MoEDispatch / Int8MoEDispatch on the experts with
    eight rows interleaved, made here from the export's bytes. They run prefill too (faster than QMoE at 64
    and 512 tokens on the mid shapes), so QMoE's copy of the experts is not loaded at all.

    4-bit experts with the exporter's int4 shared expert beside them become one Int4SharedMoEDispatch, which reads
    the shared expert as one more expert (`_shared_expert`; mid-size MoE, `cpu_kernels.py --without shared_expert`:
    1.06-1.09x at batch 1, 1.03-1.08x at batch 8). The same for 8-bit experts and for float32 measured no gain at
    batch 1 (0.96-0.98x and 0.90-0.99x), so their shared experts stay their own nodes."""
    attrs = _attrs(node)
    bits = attrs.get("expert_weight_bits")
    if len(node.input) != 7 or node.input[4] or any(attrs.get(a) != v for a, v in _QMOE_SWIGLU_READ.items()) \
            or attrs.get("block_size") not in KERNEL_BLOCKS.get(bits, ()) or not _has_vnni():
        return None
    fc1, fc1_s, fc2, fc2_s = (r.inits.get(node.input[i]) for i in (2, 3, 5, 6))
    per_byte = 8 // bits                                 # values a byte holds
    if any(t is None for t in (fc1, fc1_s, fc2, fc2_s)) or fc1.data_type != TensorProto.UINT8 \
            or fc2.data_type != TensorProto.UINT8 or not {fc1_s.name, fc2_s.name} <= r.floats \
            or len(fc1.dims) != 3 or len(fc2.dims) != 3 or fc1.dims[1] % 8 or fc2.dims[1] % 8 \
            or (per_byte * fc1.dims[2]) % attrs["block_size"] or (per_byte * fc2.dims[2]) % attrs["block_size"]:
        return None
    p = f"{node.name or node.output[0]}/cpu_kernel"
    inputs = list(node.input[:2])
    for which, (q, s) in (("fc1", (fc1, fc1_s)), ("fc2", (fc2, fc2_s))):
        w, scales = interleave_experts(bits, r.array(q.name), _per_32(r.array(s.name), attrs["block_size"], -1))
        inputs += [r.supply(f"{p}/{which}", w), r.supply(f"{p}/{which}_scales", scales)]
        r.release(q.name, s.name)
    op, outputs = _QUANT_MOE[bits], list(node.output)
    shared = bits == 4 and _shared_expert(node, r)
    layout = shared and _int4_shared_layout(shared, r, hidden=fc2.dims[1], inter=fc1.dims[1] // 2)
    if layout:
        for which, array in zip(("shared_fc1", "shared_fc1_scales", "shared_fc2", "shared_fc2_scales", "shared_gate"),
                                layout):
            inputs.append(r.supply(f"{p}/{which}", array))
        op, outputs = INT4_SHARED_OP_TYPE, list(shared.add.output)
        r.dropped.update(n.output[0] for n in shared.nodes)
    return [helper.make_node(op, inputs, outputs, name=f"{p}/quant_moe", domain=CPU_DOMAIN,
                             top_k=attrs.get("k", 1), normalize=attrs.get("normalize_routing_weights", 0))]


def _int4_shared_layout(shared: _SharedExpert, r: _Rewrite, hidden: int, inter: int) -> tuple | None:
    """The shared expert's int4 linears (the export's signed [K, N] DequantizeLinears) as one expert in the routed
    experts' interleaved layout, and its gate vector dequantized to float32 [1, H]: (fc1, fc1 scales, fc2, fc2
    scales, gate vector); None when they do not fit (other bits, blocks or shapes). Each projection is laid out
    as an int4 linear is (`interleave_int4_linear`); fc1 is the one linear [H, 2I] whose columns alternate gate
    and up, the rows of QMoE's fc1. Their DequantizeLinears are dropped."""
    from dualbrain.exporter.quantize import unpack_int4

    matches = [_signed_linear(n, r, TensorProto.INT4, lambda block: block in KERNEL_BLOCKS[4])
               for n in (shared.gate, shared.up, shared.down, shared.gate_vector)]
    want = [[hidden, inter], [hidden, inter], [inter, hidden], [hidden, 1]]
    if any(m is None or list(m[3].dims) != dims for m, dims in zip(matches, want)):
        return None
    (gate, up, down, vector), scales = zip(*((m[3], _per_32(r.array(m[4].name), m[5], 0)) for m in matches))

    def nibbles(q):      # [K, N] values, as stored (two's complement), one a byte
        b = np.frombuffer(r.raw(q), np.uint8).reshape(hidden, inter // 2)
        return np.stack([b & 0x0F, b >> 4], -1).reshape(hidden, inter)

    gate_up = (nibbles(gate) | (nibbles(up) << 4)).tobytes()          # byte j of a row: gate j, up j
    fc1 = interleave_int4_linear(gate_up, np.stack(scales[:2], -1).reshape(-1, 2 * inter))
    fc2 = interleave_int4_linear(r.raw(down), scales[2])
    gate_vector = (unpack_int4(r.raw(vector), (hidden, 1)) * scales[3].repeat(INT4_BLOCK, 0)).T.astype(np.float32)
    for _, w, dq, *_ in matches:
        r.dropped.add(w)
        r.release(*dq.input)
    return fc1[0][None], fc1[1][None], fc2[0][None], fc2[1][None], gate_vector


def _conv(node, r: _Rewrite) -> list | None:
    """CausalConv1d -> the same node, run by our kernel."""
    if len(node.input) != 3 or node.input[1] not in r.floats:
        return None
    node.domain = CPU_DOMAIN
    return [node]


def _gated_delta(node, r: _Rewrite) -> list | None:
    """GatedDeltaRule / GatedDeltaRuleWindow on a float32 state -> the same node, run by our kernel."""
    if len(node.input) != 6 or r.types.get(node.input[5]) != TensorProto.FLOAT:
        return None
    node.domain = CPU_DOMAIN
    return [node]


class _Mixer(NamedTuple):
    """The exporter's GDN mixer around GatedDeltaRule (`exporter.blocks.layers`): qkv -> CausalConv1d -> Split ->
    q, k, v reshaped to heads; q and k each a SimplifiedLayerNormalization (ort_fusions' l2norm), q's times a
    constant; after the rule, its output's norm times silu(z) (z reshaped to heads). `nodes`: all of them
    but the rule, `out` the last."""
    conv: object
    z: str                  # z before its reshape to heads
    out: object
    nodes: list
    num_k_heads: int
    scales: tuple           # q's (its constant folded in), k's, the output norm's
    eps: tuple              # the same three norms'


def _heads(r: _Rewrite, shape: str) -> tuple[int, int] | None:
    """The last two dims a Reshape to `shape` gives, when they are constants: `shape` is one, or the
    exporter's Concat(..., [heads], [dim]) along axis 0."""
    whole = r.constant(shape)
    if whole is not None:
        return tuple(int(d) for d in whole[-2:]) if whole.size >= 2 and whole[-1] > 0 and whole[-2] > 0 else None
    cat = r.producer.get(shape)
    if cat is None or cat.op_type != "Concat" or cat.domain not in _ONNX or _attrs(cat).get("axis") != 0 \
            or len(cat.input) < 2:
        return None
    last = [r.constant(i) for i in cat.input[-2:]]
    return tuple(int(d[0]) for d in last) if all(d is not None and d.size == 1 for d in last) else None


def _mixer(rule, r: _Rewrite) -> _Mixer | None:
    """The mixer around GatedDeltaRule `rule` when every value in it has only the readers it has there; else
    None."""
    made = r.made

    def value(name):
        return r.array(name) if name in r.inits else r.constant(name)

    def norm_scale(norm):   # a SimplifiedLayerNormalization's scale, when it normalises the last axis
        last_axis = norm is not None and len(norm.input) == 2 and _attrs(norm).get("axis", -1) in (-1, 3)
        scale = value(norm.input[1]) if last_axis else None
        return (norm, scale) if scale is not None and scale.ndim == 1 else None

    def normed(x):          # x made by such a norm: (the norm, its scale)
        return norm_scale(made(x, "SimplifiedLayerNormalization"))

    def only_reader(v, op):
        n = r.only_user(v)
        return n if n is not None and n.op_type == op and n.domain in _ONNX else None

    def silu(x):        # z * Sigmoid(z), z reshaped to heads: (Mul, Sigmoid, Reshape of z)
        mul = made(x, "Mul")
        for zv, s in (mul.input, mul.input[::-1]) if mul is not None and len(mul.input) == 2 else ():
            sig = made(s, "Sigmoid")
            reshape = sig is not None and sig.input[0] == zv and made(zv, "Reshape", readers=2)
            if reshape:
                return mul, sig, reshape
        return None

    q_in, k_in, v_in = rule.input[:3]
    factor, scaled = None, made(q_in, "Mul")
    for a, b in (scaled.input, scaled.input[::-1]) if scaled is not None and len(scaled.input) == 2 else ():
        c = value(b)
        if c is not None and c.size == 1 and normed(a):      # q's dk ** -0.5 after its norm
            factor, q_in = c, a
            break
    q, k, v = normed(q_in), normed(k_in), made(v_in, "Reshape")
    shaped = [made(n[0].input[0], "Reshape") if n else None for n in (q, k)]
    if not (all(shaped) and v):
        return None
    split = made(shaped[0].input[0], "Split")
    if split is None or [shaped[0].input[0], shaped[1].input[0], v.input[0]] != list(split.output) \
            or len(split.input) != 2 or any(r.users.get(o) != 1 or o in r.outputs for o in split.output):
        return None
    sizes, axis = value(split.input[1]), _attrs(split).get("axis", 0)
    conv = made(split.input[0], CONV.op_type, domains=(CONV.domain, CPU_DOMAIN))
    if sizes is None or sizes.size != 3 or axis not in (-1, 2) or conv is None or len(conv.input) != 3 \
            or conv.input[1] not in r.floats:
        return None
    # after the rule: norm(o) * silu(z)
    out_norm = norm_scale(only_reader(rule.output[0], "SimplifiedLayerNormalization"))
    gated = out_norm and only_reader(out_norm[0].output[0], "Mul")
    other = [i for i in gated.input if i != out_norm[0].output[0]] if gated and len(gated.input) == 2 else []
    found = silu(other[0]) if len(other) == 1 else None
    if not found:
        return None
    silu_mul, sigmoid, z_heads = found
    shapes = [_heads(r, n.input[1]) for n in (*shaped, v, z_heads)]
    dk = q[1].size
    if any(x is None for x in shapes) or k[1].size != dk or shapes[0] != shapes[1] or shapes[0][1] != dk \
            or shapes[2] != shapes[3] or out_norm[1].size != shapes[2][1]:
        return None
    hk, (hv, dv) = shapes[0][0], shapes[2]
    if sizes.tolist() != [hk * dk, hk * dk, hv * dv]:
        return None
    q_scale = q[1] * np.float32(factor.reshape(-1)[0]) if factor is not None else q[1]
    nodes = [conv, split, *shaped, v, q[0], k[0], *([scaled] if factor is not None else []),
             out_norm[0], z_heads, sigmoid, silu_mul, gated]
    norms = (q[0], k[0], out_norm[0])
    return _Mixer(conv, z_heads.input[0], gated, nodes, hk,
                  tuple(np.asarray(a, np.float32) for a in (q_scale, k[1], out_norm[1])),
                  tuple(float(_attrs(n).get("epsilon", 1e-5)) for n in norms))


class _Gates(NamedTuple):
    """The exporter's gates feeding GatedDeltaRule: beta = Sigmoid(b) and g = -exp(A_log) * softplus(a + dt_bias),
    torch's softplus (beta 1, threshold 20) as it reaches ONNX: Where(x * 1 > 20, x, Softplus(x * 1) / 1)."""
    a: str
    b: str
    params: np.ndarray      # [2, Hv]: dt_bias, A = exp(A_log)
    nodes: list


def _gates(rule, r: _Rewrite) -> _Gates | None:
    """The gates feeding `rule`, when every value in them is read only inside them; else None."""
    def node(value, op):    # its readers are checked all at once below
        return r.made(value, op, readers=None)

    def scalar(name):       # a one-element constant, or one cast like another value
        cast = node(name, "CastLike")
        return r.scalar(cast.input[0] if cast is not None else name), cast

    sigmoid, mul = node(rule.input[4], "Sigmoid"), node(rule.input[3], "Mul")
    for neg_value, softplus_value in (mul.input, mul.input[::-1]) if mul is not None and len(mul.input) == 2 else ():
        neg = node(neg_value, "Neg")
        exp, where = neg and node(neg.input[0], "Exp"), node(softplus_value, "Where")
        if exp and where and exp.input[0] in r.inits and len(where.input) == 3:
            break
    else:
        return None
    greater, add, div = node(where.input[0], "Greater"), node(where.input[1], "Add"), node(where.input[2], "Div")
    scaled = greater and node(greater.input[0], "Mul")
    softplus = div and node(div.input[0], "Softplus")
    if not (sigmoid and add and scaled and softplus) or softplus.input[0] != scaled.output[0] \
            or add.output[0] not in scaled.input or len(scaled.input) != 2 or len(add.input) != 2:
        return None
    one, one_cast = scalar(next(i for i in scaled.input if i != add.output[0]))
    limit, limit_cast = scalar(greater.input[1])
    unit, unit_cast = scalar(div.input[1])
    a, dt_bias = add.input if add.input[1] in r.inits else add.input[::-1]
    if (one, limit, unit) != (1.0, 20.0, 1.0) or dt_bias not in r.inits:
        return None
    dt, a_log = r.array(dt_bias), r.array(exp.input[0])
    if dt.ndim != 1 or dt.shape != a_log.shape or dt.dtype != np.float32 or a_log.dtype != np.float32:
        return None
    nodes = [n for n in (sigmoid, mul, neg, exp, where, greater, add, div, scaled, softplus, one_cast, limit_cast,
                         unit_cast) if n is not None]
    inside = {id(n) for n in nodes} | {id(rule)}
    values = {o for n in nodes for o in n.output} - {mul.output[0], sigmoid.output[0]}
    if any(id(n) not in inside and _reads(n) & values for n in r.graph.node) \
            or any(r.users.get(v) != 1 for v in (mul.output[0], sigmoid.output[0])):
        return None         # a value of the gates is read elsewhere
    return _Gates(a, sigmoid.input[0], np.stack([dt, np.exp(a_log)]).astype(np.float32), nodes)


def _gated_delta_mixer(rule, r: _Rewrite) -> list | None:
    """GatedDeltaRule inside the exporter's mixer (`_mixer`) -> one GatedDeltaMixer (its reference:
    `gated_delta.reference.gated_delta_mixer`): the conv, the split, the reshapes, the q/k norms, the rule
    and the gated output norm in one kernel, one parallel pass a layer instead of two and ~20 nodes; with the
    gates' nodes too (`_gates`), GatedDeltaMixerRawGates."""
    if rule.op_type != GDN.op_type or len(rule.input) != 6 or r.types.get(rule.input[5]) != TensorProto.FLOAT:
        return None
    mixer = _mixer(rule, r)
    if mixer is None:
        return None
    p, conv = f"{rule.name or rule.output[0]}/cpu_kernel", mixer.conv
    weight_t = r.supply(f"{p}/conv_weight_t", np.ascontiguousarray(r.array(conv.input[1]).T))
    consts = [r.supply(f"{p}/{name}", a) for name, a in zip(("q_scale", "k_scale", "norm"), mixer.scales)]
    eps = r.supply(f"{p}/eps", np.array(mixer.eps, np.float32))
    gates = _gates(rule, r)
    folded = mixer.nodes + (gates.nodes if gates else [])
    for n in folded:
        r.dropped.add(n.output[0])
    r.release(conv.input[1], *(i for n in folded[1:] for i in n.input))
    g_beta = [gates.a, gates.b] if gates else list(rule.input[3:5])
    extra = [r.supply(f"{p}/gate_params", gates.params)] if gates else []
    return [helper.make_node(MIXER_RAW_OP_TYPE if gates else MIXER_OP_TYPE,
                             [conv.input[0], weight_t, conv.input[2], mixer.z, *g_beta, rule.input[5], *consts, eps,
                              *extra],
                             [mixer.out.output[0], conv.output[1], rule.output[1]], name=f"{p}/mixer",
                             domain=CPU_DOMAIN, num_k_heads=mixer.num_k_heads)]


def _gated_delta_layer(node, r: _Rewrite) -> list | None:
    """GatedDeltaRule: with its mixer in one kernel where it matches (`_gated_delta_mixer`), else alone."""
    return _gated_delta_mixer(node, r) or _gated_delta(node, r)


def _cached_attention(node, r: _Rewrite) -> list | None:
    """The exporter's `Attention` over Transpose(Concat(past, new)) K and V (`onnxruntime.attention_cache`), float32,
    a boolean mask, no attribute but `scale` -> CachedAttention (its reference: `cached_attention.reference`), which
    reads the cache where it lies; the Concats and Transposes go with it where nothing else reads them. A mask the
    graph records as other than 4-D (ONNX's broadcast forms) is left to the split form."""
    mask = r.shapes.get(node.input[3])
    if node.domain not in _ONNX or len(node.input) != 4 or len(node.output) != 1 \
            or any(a.name != "scale" for a in node.attribute) or (mask is not None and len(mask.dim) not in (0, 4)):
        return None
    key, value = attention_cache(r.producer, node.input[1]), attention_cache(r.producer, node.input[2])
    if key is None or value is None or r.types.get(node.input[3]) != TensorProto.BOOL \
            or any(r.types.get(v) != TensorProto.FLOAT for v in (node.input[0], *key[:2], *value[:2])):
        return None
    p = f"{node.name or node.output[0]}/cpu_kernel"
    scale = _attrs(node).get("scale", 0.0)
    if not scale:       # the op's default, 1 / sqrt(head size), where the graph records q's last dim
        dims = r.shapes.get(node.input[0])
        last = dims.dim[-1] if dims is not None and len(dims.dim) == 4 else None
        if last is None or not last.HasField("dim_value"):
            return None
        scale = last.dim_value ** -0.5
    r.dropped.update(n.output[0] for chain in (key[2], value[2]) for n in unread_copies(chain, r.users, r.outputs))
    return [helper.make_node(ATTENTION_OP, [node.input[0], key[0], key[1], value[0], value[1], node.input[3],
                                            r.supply(f"{p}/scale", np.array([scale], np.float32))],
                             list(node.output), name=f"{p}/attention", domain=CPU_DOMAIN)]


def _signed_linear(node, r: _Rewrite, data_type: int, blocks) -> tuple | None:
    """(x, the weight's value, its DequantizeLinear, q, scale, block) when `node` is MatMul(x, DequantizeLinear(q,
    scale)) on the export's signed blockwise `data_type` weight [K, N] (axis 0, no zero point, the block
    size one `blocks` accepts), the DequantizeLinear read by nothing else; else None. A Gemm without bias,
    scaling or transposes (the exporter's MoE router and shared expert) is the same MatMul."""
    plain = {"alpha": 1.0, "transA": 0, "transB": 0}        # a Gemm's defaults: absent means plain
    if len(node.input) != 2 or node.op_type == "Gemm" and any(_attrs(node).get(a, v) != v for a, v in plain.items()):
        return None
    x, w = node.input
    dq = r.producer.get(w)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) != 2 \
            or r.users.get(w) != 1 or w in r.outputs:
        return None
    q, scale = (r.inits.get(i) for i in dq.input)
    attrs = _attrs(dq)
    block = attrs.get("block_size", 0)
    if q is None or scale is None or q.data_type != data_type or scale.data_type != TensorProto.FLOAT \
            or len(q.dims) != 2 or attrs.get("axis") != 0 or not blocks(block) or q.dims[0] % block:
        return None
    return x, w, dq, q, scale, block


def _siblings(node, match: tuple, r: _Rewrite, matcher, alike=lambda a, b: True) -> list[tuple]:
    """[(node, match)] and, when `node` is a MatMul, every other MatMul reading the same x that `matcher` matches
    and `alike` pairs with `match` (each with its match): linears to run as one over their weights side by
    side, their output split (`_split`). On the exports that is a GDN layer's four input projections and an
    attention layer's q, k and v; x is then quantized once and the weights streamed in one parallel pass
    instead of one a linear (the GDN gates' projections are 16 wide). Gemms (the MoE router, the shared
    expert) stay their own: the int4 MoE rewrite folds the shared expert, the quantized modes keep the router
    at 8 bits, and grouping them measured no gain at fp32 or int8 (RESULTS, thirteenth pass)."""
    linears = [(node, match)]
    if node.op_type == "MatMul":
        for other in r.readers.get(match[0], []):
            if other is node or other.op_type != "MatMul" or other.output[0] in r.dropped:
                continue
            found = matcher(other, r)
            if found and found[0] == match[0] and alike(match, found):
                linears.append((other, found))
    return linears


def _split(linears: list[tuple], widths: list[int], y: str, p: str, r: _Rewrite) -> list:
    """Nodes splitting `y`, the outputs of `linears` (`_siblings`) side by side (`widths` wide), into each one's
    output; the others' MatMuls are marked folded. None for one linear (its node gives its output itself)."""
    if len(linears) == 1:
        return []
    r.dropped.update(other.output[0] for other, _ in linears[1:])
    return [helper.make_node("Constant", [], [f"{p}/widths"], name=f"{p}/widths",
                             value=helper.make_tensor(f"{p}/widths", TensorProto.INT64, [len(widths)], widths)),
            helper.make_node("Split", [y, f"{p}/widths"], [node.output[0] for node, _ in linears], name=f"{p}/split",
                             axis=-1)]


def _int8_match(node, r: _Rewrite) -> tuple | None:
    """`_signed_linear`'s match for an int8 weight in blocks of a power of two >= 16; else None."""
    return _signed_linear(node, r, TensorProto.INT8, lambda block: block >= 16 and not block & (block - 1))


def _int8_linear_behind_if(node, r: _Rewrite) -> list | None:
    """MatMul(x, DequantizeLinear(int8 [K, N], scale, axis 0)) -> If(tokens <= KERNEL_MAX_TOKENS,
    Int8MatMul (int16 activations), com.microsoft.MatMulNBits (int8 activations, for prefill)), both
    reading one copy of the weight in MatMulNBits' layout, made here from the export's bytes; with the
    int8 linears of the same x and block (`_siblings`) as one, behind one If."""
    match = _int8_match(node, r)
    if match is None:
        return None
    linears = _siblings(node, match, r, _int8_match, alike=lambda a, b: a[5] == b[5])
    x, block, k = match[0], match[5], match[3].dims[0]
    widths = [m[3].dims[1] for _, m in linears]
    p = f"{node.name or node.output[0]}/cpu_kernel"
    rows = [to_rows(r.array(dq.input[0]), r.array(dq.input[1]), block) for _, (_, _, dq, *_) in linears]
    for _, (_, w, dq, *_) in linears:
        r.dropped.add(w)
        r.release(*dq.input)
    weights = [r.supply(f"{p}/b", np.concatenate([b for b, _ in rows])),
               r.supply(f"{p}/scales", np.concatenate([s for _, s in rows]))]
    y = node.output[0] if len(linears) == 1 else f"{p}/y_all"
    ours = helper.make_node(INT8_OP, [x, *weights], [f"{p}/y"], name=f"{p}/int8", domain=CPU_DOMAIN, block_size=block)
    theirs = helper.make_node("MatMulNBits", [x, *weights], [f"{p}/y_ort"], name=f"{p}/nbits",
                              domain=MS_DOMAIN, K=k, N=sum(widths), bits=8, block_size=block,
                              accuracy_level=ACCURACY_LEVEL)
    return _decode_or_prefill(r, x, KERNEL_MAX_TOKENS * k, y, p, ours, theirs) + _split(linears, widths, y, p, r)


def _int4_linear(node, r: _Rewrite) -> list | None:
    """MatMul(x, DequantizeLinear(int4 [K, N], scale, axis 0, `KERNEL_BLOCKS[4]`)) -> Int4MatMul on the weight with
    eight rows interleaved, made here from the export's bytes, for calls of any size; so MatMulNBits' copy
    (which ONNX Runtime would fuse from the same nodes) is never made. With the int4 linears of the same x
    (`_siblings`, any block: the layout holds a scale per 32) as one."""
    match = _int4_match(node, r)
    if not match:
        return None
    linears = _siblings(node, match, r, _int4_match)
    p = f"{node.name or node.output[0]}/cpu_kernel"
    weights, scales = [], []
    for _, (_, w, dq, q, scale, block) in linears:
        laid_out = interleave_int4_linear(r.raw(q), _per_32(r.array(scale.name), block, 0))
        weights.append(laid_out[0])
        scales.append(laid_out[1])
        r.dropped.add(w)
        r.release(*dq.input)
    y = node.output[0] if len(linears) == 1 else f"{p}/y_all"
    inputs = [match[0], r.supply(f"{p}/w", np.concatenate(weights)), r.supply(f"{p}/scales", np.concatenate(scales))]
    return [helper.make_node(INT4_LINEAR_OP, inputs, [y], name=f"{p}/int4", domain=CPU_DOMAIN),
            *_split(linears, [m[3].dims[1] for _, m in linears], y, p, r)]


def _int4_match(node, r: _Rewrite) -> tuple | None:
    """`_signed_linear`'s match for an int4 weight the interleaved layout takes (on a CPU with VNNI); else None."""
    match = _has_vnni() and _signed_linear(node, r, TensorProto.INT4, lambda block: block in KERNEL_BLOCKS[4])
    return match if match and not match[3].dims[1] % 8 else None


def _float_match(node, r: _Rewrite) -> tuple | None:
    """(x, w, [K, N], the float32 initializer, True when w is its Transpose) when `node` is MatMul(x, w) with w a
    float32 [K, N] initializer or the exporter's Transpose of one (torch's linear), w read by nothing else;
    else None. ([0] and [1] as in `_signed_linear`'s match.)"""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    x, w = node.input
    if r.users.get(w) != 1 or w in r.outputs:
        return None
    t = r.made(w, "Transpose")
    transposed = t is not None and _attrs(t).get("perm") == [1, 0]
    init = r.inits.get(t.input[0] if transposed else w)
    if init is None or init.name not in r.floats or len(init.dims) != 2:
        return None
    return x, w, list(init.dims[::-1] if transposed else init.dims), init.name, transposed


def _float_linears(node, r: _Rewrite) -> list | None:
    """float32 MatMuls of one x (`_siblings`) -> MatMul(x, Concat(their weights)) and a Split: one MLAS pass
    instead of one a linear. The Concat (and the Transposes of torch's [N, K] weights) read constants only, so
    ONNX Runtime folds them at load: the weights are not copied into the graph. A lone MatMul stays as it is."""
    match = _float_match(node, r)
    linears = match and _siblings(node, match, r, _float_match)
    if not linears or len(linears) == 1:
        return None
    p = f"{node.name or node.output[0]}/cpu_kernel"
    nodes, parts = [], []
    for i, (_, (_, w, _, init, transposed)) in enumerate(linears):
        if transposed:       # made here: a sibling's own Transpose may come after this node
            nodes.append(helper.make_node("Transpose", [init], [f"{p}/w{i}"], name=f"{p}/w{i}", perm=[1, 0]))
            r.dropped.add(w)
        parts.append(f"{p}/w{i}" if transposed else init)
    return [*nodes, helper.make_node("Concat", parts, [f"{p}/w"], name=f"{p}/weights", axis=1),
            helper.make_node("MatMul", [match[0], f"{p}/w"], [f"{p}/y_all"], name=f"{p}/matmul"),
            *_split(linears, [m[2][1] for _, m in linears], f"{p}/y_all", p, r)]


def _linear(node, r: _Rewrite) -> list | None:
    """A MatMul on a quantized weight (the int8 or the int4 rewrite, whichever matches) or on a float32 one
    beside others of the same x."""
    return _int8_linear_behind_if(node, r) or _int4_linear(node, r) or _float_linears(node, r)


# (domain, op type) -> the rewrite (None: the node stays as it is)
REWRITES = {
    (MOE.domain, MOE.op_type): _moe_behind_if,
    (MS_DOMAIN, "QMoE"): _quant_moe,
    (CONV.domain, CONV.op_type): _conv,
    (GDN.domain, GDN.op_type): _gated_delta_layer,
    (GDN.domain, GDN.window_op_type): _gated_delta,
    ("", "MatMul"): _linear,
    ("", "Gemm"): _int4_linear,        # int8's If costs more than its kernel saves on these small linears
    ("", "Attention"): _cached_attention,
}


def _reads(node) -> set[str]:
    """The values `node` reads: its inputs and, for an If, whatever its branches read from outside them."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names |= _reads(n)
    return names


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` without those whose outputs nothing reads: what a rewrite left feeding only nodes it
    folded (e.g. the Concat that built a dropped Reshape's shape), which ONNX Runtime would still run."""
    needed, live = set(outputs), []
    for n in reversed(nodes):
        if not n.output or any(o in needed for o in n.output):
            live.append(n)
            needed |= _reads(n)
    return live[::-1]


def use_cpu_kernels(model, model_dir=".", supplied: dict[str, np.ndarray] | None = None) -> int:
    """Hand the nodes our kernels cover (`REWRITES`) in `model`'s main graph to them; returns how many
    nodes were rewritten. `model_dir`: where the model's external data lies (the int8 linears' and int4
    experts' weights are read to lay them out for the kernels). `supplied`: where the relaid weights
    (int8 linears, int4 experts) go instead of into the graph (`_Rewrite.supply`); the session's options must then add
    them (`SessionOptions.add_initializer`). The session must have loaded `library()`."""
    g = model.graph
    r = _Rewrite(model, model_dir, supplied)
    replaced = {}
    for index, node in enumerate(g.node):
        if node.output and node.output[0] in r.dropped:     # folded into an earlier node's rewrite
            continue
        rewrite = REWRITES.get((node.domain, node.op_type))
        new = rewrite(node, r) if rewrite else None
        if new is not None:
            replaced[index] = new
    if replaced:
        nodes = [n for i, node in enumerate(g.node) if not (node.output and node.output[0] in r.dropped)
                 for n in replaced.get(i, [node])]
        nodes = _live(nodes, r.outputs) if r.dropped else nodes
        del g.node[:]
        g.node.extend(nodes)
        kept = [t for t in g.initializer if t.name not in r.drop_inits] + r.add_inits
        del g.initializer[:]
        g.initializer.extend(kept)
        if not any(o.domain == CPU_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(CPU_DOMAIN, 1))
    return len(replaced)
