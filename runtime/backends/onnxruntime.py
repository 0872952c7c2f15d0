"""ONNX Runtime backend: one InferenceSession per block, shared by every generation and thread.

Window variants (and the linked window graph) get their sessions on first use: plain generation
never loads them. With a linked whole-model graph, so do the blocks' own sessions (each would hold a
second copy of the weights): plain generation runs the linked graph alone."""
from __future__ import annotations

import contextlib
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


def attention_cache(producer: dict, name: str):
    """(past, new, [Transpose, Concat]) when value `name` is K or V as the exporter feeds an `Attention` node:
    Transpose[1, 2, 0, 3](Concat along axis 0 (past, new)) of sequence-major rows; else None. `producer`: value ->
    the node that makes it."""
    t = producer.get(name)
    perm = [list(a.ints) for a in t.attribute if a.name == "perm"] if t is not None else None
    if t is None or t.op_type != "Transpose" or perm != [[1, 2, 0, 3]]:
        return None
    c = producer.get(t.input[0])
    if c is None or c.op_type != "Concat" or len(c.input) != 2 or [a.i for a in c.attribute if a.name == "axis"] != [0]:
        return None
    return c.input[0], c.input[1], [t, c]


def unread_copies(chain: list, users: dict, outputs: set) -> list:
    """The nodes of an `attention_cache` chain ([Transpose, Concat]) read by nothing but the attention node, in
    order: dead once the node is rewritten to read the cache in place. `users`: value -> how many nodes read it."""
    dead = []
    for node in chain:
        if users.get(node.output[0], 0) != 1 or node.output[0] in outputs:
            break
        dead.append(node)
    return dead


def split_attention(model) -> int:
    """Rewrite every full-attention `Attention` node of the graph into MatMul/Softmax/MatMul that read
    the past K/V where they are; returns how many nodes were rewritten.

    The export carries the form TensorRT fuses (exporter.blocks.layers.GatedAttentionMixer): K/V =
    Transpose(Concat(past, new)) into a standard `Attention` node, grouped-query heads, and a
    (B, 1, S, total) mask. ONNX Runtime's CPU build copies the whole cache for that Concat/Transpose
    and its Attention kernel repeats K/V per query head: decode over 16384 positions (16 q / 2 KV
    heads of 256) took ~5x the time of this form, which scores the past and the new keys apart
    against sequence-major K/V (ONNX Runtime folds the transposes into its MatMuls), with each
    group's query heads folded into the rows (query head h = g*rep + r shares K/V head g) and one
    float32 softmax over both parts. Same sums, so `diff` still checks the exported node; a node not
    fed that way is left as it is. Head counts come from the tensors' shapes at run time."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    outputs = {o.name for o in g.output}

    replaced, dropped, n = {}, set(), 0
    for node in g.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) != 4 \
                or len(node.output) != 1 or any(a.name != "scale" for a in node.attribute):
            continue
        key, value = attention_cache(producer, node.input[1]), attention_cache(producer, node.input[2])
        if key is None or value is None:
            continue
        q, _, _, mask = node.input
        scale = next((a.f for a in node.attribute if a.name == "scale"), None)
        (past_k, new_k, kn), (past_v, new_v, vn) = key, value
        p = f"{node.name or node.output[0]}/split"
        consts = {"zero": [0], "minus": [-1], "one": [1], "ones": [1, 1], "end": [2 ** 62], "last": [-1]}
        for k, v in consts.items():
            g.initializer.append(numpy_helper.from_array(np.array(v, np.int64), f"{p}/{k}"))
        low = np.finfo(np.float32).min
        g.initializer.append(numpy_helper.from_array(np.array(low, np.float32), f"{p}/low"))
        mk = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{p}/{out}"], name=f"{p}/{out}", **kw)  # noqa: E731
        # (B, heads, S, hd) -> (B, kv_heads, rep*S, hd); the mask's rows tiled rep = heads / kv_heads times
        nodes = [mk("Shape", [q], "qshape"), mk("Shape", [past_k], "kv_heads", start=2, end=3),
                 mk("Shape", [q], "heads", start=1, end=2), mk("Div", [f"{p}/heads", f"{p}/kv_heads"], "rep"),
                 mk("Concat", [f"{p}/zero", f"{p}/kv_heads", f"{p}/minus", f"{p}/zero"], "rows", axis=0),
                 mk("Concat", [f"{p}/ones", f"{p}/rep", f"{p}/one"], "tile", axis=0),
                 mk("Reshape", [q, f"{p}/rows"], "qg"), mk("Shape", [q], "qhd", start=3, end=4),
                 mk("Cast", [f"{p}/qhd"], "hd", to=TensorProto.FLOAT)]
        if scale is None:   # the op's default: 1 / sqrt(head dim)
            nodes += [mk("Sqrt", [f"{p}/hd"], "root"), mk("Reciprocal", [f"{p}/root"], "scale32")]
        else:
            g.initializer.append(numpy_helper.from_array(np.array([scale], np.float32), f"{p}/scale32"))
        nodes += [mk("Transpose", [past_k], "kp", perm=[1, 2, 3, 0]), mk("Transpose", [new_k], "kn", perm=[1, 2, 3, 0]),
                  mk("MatMul", [f"{p}/qg", f"{p}/kp"], "sp"), mk("MatMul", [f"{p}/qg", f"{p}/kn"], "sn"),
                  mk("Concat", [f"{p}/sp", f"{p}/sn"], "s", axis=-1), mk("Cast", [f"{p}/s"], "s32", to=TensorProto.FLOAT),
                  mk("Mul", [f"{p}/s32", f"{p}/scale32"], "scaled"), mk("Tile", [mask, f"{p}/tile"], "mask"),
                  mk("Where", [f"{p}/mask", f"{p}/scaled", f"{p}/low"], "masked"),
                  mk("Softmax", [f"{p}/masked"], "p32", axis=-1), mk("CastLike", [f"{p}/p32", q], "probs"),
                  mk("Shape", [past_k], "past", start=0, end=1),
                  mk("Slice", [f"{p}/probs", f"{p}/zero", f"{p}/past", f"{p}/last"], "pp"),
                  mk("Slice", [f"{p}/probs", f"{p}/past", f"{p}/end", f"{p}/last"], "pn"),
                  mk("Transpose", [past_v], "vp", perm=[1, 2, 0, 3]), mk("Transpose", [new_v], "vn", perm=[1, 2, 0, 3]),
                  mk("MatMul", [f"{p}/pp", f"{p}/vp"], "op"), mk("MatMul", [f"{p}/pn", f"{p}/vn"], "on"),
                  mk("Add", [f"{p}/op", f"{p}/on"], "o"),
                  # back to (B, heads, S, hd): q's shape, V's head dim being q's in these models
                  helper.make_node("Reshape", [f"{p}/o", f"{p}/qshape"], [node.output[0]], name=f"{p}/y")]
        replaced[id(node)] = nodes
        # the Transpose(Concat) copies of the cache are dead now unless something else reads them
        dropped.update(id(t) for chain in (kn, vn) for t in unread_copies(chain, users, outputs))
        n += 1
    if n:
        new_nodes = []
        for node in g.node:
            if id(node) in dropped:
                continue
            new_nodes.extend(replaced.get(id(node), [node]))
        del g.node[:]
        g.node.extend(new_nodes)
    return n


@contextlib.contextmanager
def _load_errors(name: str, file: str):
    """onnx and onnxruntime raise assorted types on corrupt files: each becomes the user-facing error."""
    try:
        yield
    except DualbrainError:
        raise
    except Exception as e:
        raise DualbrainError(f"cannot load {name} ({file}): {str(e).splitlines()[0]}") from None


class OrtBackend:
    name = "onnxruntime"
    max_batch = max_new_positions = None       # any shape

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None, linked: bool = True, cpu_mem_arena: bool = False,
                 profile: str | None = None, cpu_kernels: bool = True):
        """`profile`: a file prefix; every session writes ONNX Runtime's profile (per-node times) there,
        returned by `end_profiling()` (tests/benchmarks/profile_decode.py). `cpu_kernels`: use
        dualbrain's own CPU kernels where they apply and build (`ort_kernels`; CPU provider only)."""
        import onnxruntime as ort

        from dualbrain.runtime.backends import ort_kernels

        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self._ort = ort
        self._lock = threading.Lock()
        self._settings = (threads, cpu_mem_arena, profile)
        self._providers = providers or ["CPUExecutionProvider"]
        self.cpu_kernels = ort_kernels.library() if cpu_kernels and self._providers == ["CPUExecutionProvider"] else None
        self._supplied: dict[str, dict] = {}     # per session: the OrtValues handed to it by add_initializer
        self.sessions: dict[str, object] = {}
        self.convert_bf16 = manifest.dtype == "bfloat16" and self._providers == ["CPUExecutionProvider"]
        self._files = {b.name: b.file for b in manifest.blocks}
        self._files.update({b.name + WINDOW: b.window_file for b in manifest.blocks if b.window_file})
        if manifest.linked and linked:
            self._files[LINKED] = manifest.linked
            if manifest.linked_window:
                self._files[LINKED + WINDOW] = manifest.linked_window
        # With a linked graph the blocks' own sessions (layer-granular modes) load on first use, as side
        # blocks (the MTP head) always do; their files are checked now, so a broken export fails at load.
        # Mid-size MoE, RSS after load + 2 steps: int8 2.39 -> 1.29 GB (README).
        for b in manifest.chain:
            if LINKED in self._files:
                self._read(b.name, self._files[b.name])
            else:
                self._session(b.name)
        if LINKED in self._files:
            self._session(LINKED)

    def _options(self, linked_session: bool, initializers: dict | None = None):
        """A session's options: the linked graph's or a block's (`linked_session`), with `initializers`
        (name -> OrtValue, kept alive by the caller) read by the session in place."""
        threads, cpu_mem_arena, profile = self._settings
        spinning = linked_session
        opts = self._ort.SessionOptions()
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile
        if self.cpu_kernels:
            opts.register_custom_ops_library(str(self.cpu_kernels))
        for name, value in (initializers or {}).items():
            opts.add_initializer(name, value)
        opts.log_severity_level = 3
        # Sequence lengths grow every decode step; ORT's CPU arena keeps a block for each new size and
        # grows without bound over long generations (measured: ~9 KB/token). Plain malloc/free does not.
        opts.enable_cpu_mem_arena = cpu_mem_arena
        # ORT caches a memory plan per distinct input shape; every decode step is a new shape
        opts.enable_mem_pattern = False
        if threads:
            opts.intra_op_num_threads = threads
        # graphs rewritten in memory (_load) are handed over as bytes: their weights stay in the export
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.model_dir))
        if not spinning:
            # Block sessions run one after another (a session per layer; two models in fused mode): threads
            # left spinning by one session take the cores from the next one's. Measured on the mid-size MoE,
            # 2 cores, one decode step: per-block 90 -> 57 ms without spinning; the linked graph, one
            # session, keeps it (48 vs 51 ms without).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def end_profiling(self) -> list[str]:
        """Stop profiling; the profile files written (one per session that ran)."""
        return [s.end_profiling() for s in self.sessions.values()]

    def _session(self, name: str):
        if name in self.sessions:
            return self.sessions[name]
        with self._lock:
            if name not in self.sessions:
                self.sessions[name] = self._load(name, self._files[name])
        return self.sessions[name]

    def _path(self, file: str) -> Path:
        return safe_child(self.model_dir, file, "manifest.json")

    def _read(self, name: str, file: str):
        """Block `name`'s graph (`file`), its external data checked but not read."""
        import onnx

        with _load_errors(name, file):
            model = onnx.load(str(self._path(file)), load_external_data=False)
            check_external_data(self.model_dir, model)
            return model

    def _load(self, name: str, file: str):
        import onnx

        from dualbrain.runtime.backends.ort_fusions import fuse_rms_norm
        from dualbrain.runtime.backends.ort_kernels import use_cpu_kernels
        from dualbrain.runtime.backends.ort_quant import fuse_quantized, widen_scales

        model = self._read(name, file)
        with _load_errors(name, file):
            rewritten = widen_scales(model, self.model_dir)       # first: the rewrites below read float32 scales
            rewritten += fuse_quantized(model, self.model_dir) + fuse_rms_norm(model)
            if self.convert_bf16:
                onnx.load_external_data_for_model(model, str(self.model_dir))
                bf16_to_fp32(model)
            supplied: dict = {}
            if self.cpu_kernels:    # after the bf16 rewrite: its experts are float32 by then
                rewritten += use_cpu_kernels(model, self.model_dir, supplied)
            rewritten += split_attention(model)     # the attention nodes our kernel did not take
            # the relaid weights reach the session as OrtValues over the arrays: no copy in the graph's bytes
            values = {n: self._ort.OrtValue.ortvalue_from_numpy(a) for n, a in supplied.items()}
            self._supplied[name] = values        # ONNX Runtime reads them in place: they live as the session does
            opts = self._options(name.startswith(LINKED), values)
            if rewritten or self.convert_bf16:
                return self._ort.InferenceSession(model.SerializeToString(), opts, providers=self._providers)
            return self._ort.InferenceSession(str(self._path(file)), opts, providers=self._providers)

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
