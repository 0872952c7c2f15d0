"""Streaming, validating safetensors reader for Qwen3.5 / Qwen3.6 checkpoints.

Tensors are read lazily, one block at a time, so peak memory is bounded by the largest block.
Headers are parsed and checked against the file size before anything is mapped; names, dtypes and
shapes are checked against the `ModelSpec`. safetensors only: pickle formats are refused.
Both MoE expert layouts are read: stacked 3-D (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) and per-expert (`mlp.experts.N.{gate,up,down}_proj.weight`).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from dualbrain.errors import DualbrainError
from dualbrain.runtime import dtypes
from dualbrain.runtime.spec import FULL, LINEAR, ModelSpec

if TYPE_CHECKING:  # torch is an export-time dependency only
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype name -> bytes per element, and the float ones a weight may have (runtime.dtypes)
DTYPE_SIZES = {d.safetensors: d.itemsize for d in dtypes.TABLE if d.safetensors}
FLOAT_DTYPES = tuple(dtypes.dtype(n).safetensors for n in dtypes.FLOAT_DTYPES)
MAX_HEADER = 100 * 1024 * 1024


def _torch_dtype(st: str):
    """torch dtype of a safetensors dtype name (torch is imported only when exporting)."""
    return dtypes.torch_dtype(dtypes.from_safetensors(st).name)


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without mapping the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise DualbrainError(f"truncated safetensors file {path.name}: no header length")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise DualbrainError(
                    f"truncated or corrupt safetensors file {path.name}: header of {n} bytes exceeds file size {size}"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise DualbrainError(f"missing safetensors file {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DualbrainError(f"corrupt safetensors header in {path.name}") from None
    if not isinstance(header, dict):
        raise DualbrainError(f"corrupt safetensors header in {path.name}")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DualbrainError(f"corrupt safetensors header in {path.name}: bad entry {name!r}") from None
        if dtype not in DTYPE_SIZES or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise DualbrainError(f"unsupported dtype or shape for tensor {name!r} in {path.name}")
        count = 1
        for s in shape:
            count *= s
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise DualbrainError(f"corrupt safetensors header in {path.name}: bad offsets for {name!r}")
        if end > data_size:
            raise DualbrainError(
                f"truncated safetensors file {path.name}: tensor {name!r} ends at byte {end} past the data size {data_size}"
            )
        if end - start != count * DTYPE_SIZES[dtype]:
            raise DualbrainError(f"corrupt safetensors header in {path.name}: size mismatch for {name!r}")
        tensors[name] = {"dtype": dtype, "shape": shape, "offset": 8 + n + start}
    return tensors


def find_weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DualbrainError(f"invalid model.safetensors.index.json in {root}") from None
        for f in files:
            if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts:
                raise DualbrainError(f"model.safetensors.index.json names an unsafe path {f!r}")
        return [root / f for f in files]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise DualbrainError(
            f"refusing pickle checkpoint {pickles[0]}: pickle files can run arbitrary code when loaded; "
            "convert it to safetensors first"
        )
    raise DualbrainError(f"no safetensors weights (model.safetensors or an index) in {root}")


class Checkpoint:
    """Lazily reads the language-model tensors of a checkpoint, validated against its spec."""

    def __init__(self, root: str | os.PathLike, spec: ModelSpec | None = None):
        self.root = Path(root)
        self.spec = spec or ModelSpec.from_dir(self.root)
        self.files = find_weight_files(self.root)
        self.where: dict[str, Path] = {}   # full tensor name -> file
        self.meta: dict[str, dict] = {}
        for f in self.files:
            for name, info in read_header(f).items():
                self.where[name] = f
                self.meta[name] = info
        self._handles: dict[Path, object] = {}
        self.prefix = self.spec.weight_prefix

    def identity(self) -> dict[str, str]:
        """What a pair's bridges are bound to (runtime/bridges.py), recorded in exports' manifests too:
        sha256 of the config (canonical JSON), of the safetensors headers (names, dtypes, shapes,
        offsets: the tensor layout, without reading the data) and of the tokenizer's vocabulary,
        merges and added tokens (`Tokenizer.fingerprint`), when the checkpoint has one."""
        import hashlib

        def digest(x) -> str:
            return hashlib.sha256(json.dumps(x, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

        out = {"config": digest(json.loads((self.root / "config.json").read_text(encoding="utf-8"))),
               "weights": digest(self.meta)}
        if (self.root / "tokenizer.json").is_file():
            from dualbrain.runtime.chat import Tokenizer

            out["tokenizer"] = Tokenizer.from_dir(self.root).fingerprint()
        return out

    # ---- raw access -----------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self.prefix + name in self.where

    def get(self, name: str, shape: tuple[int, ...], *, absolute: bool = False, dtype=None) -> "torch.Tensor":
        """One tensor, shape-checked, cast to `dtype`; `name` is relative to the language-model prefix."""
        full = self._checked(name, shape, absolute)
        t = self._handle(self.where[full]).get_tensor(full)
        return t if dtype is None else t.to(dtype)

    def _checked(self, name: str, shape: tuple[int, ...], absolute: bool = False) -> str:
        full = name if absolute else self.prefix + name
        if full not in self.where:
            raise DualbrainError(f"checkpoint is missing tensor {full!r}")
        info = self.meta[full]
        if tuple(info["shape"]) != tuple(shape):
            raise DualbrainError(
                f"tensor {full!r} has shape {tuple(info['shape'])}, the config implies {tuple(shape)}"
            )
        if info["dtype"] not in FLOAT_DTYPES:
            raise DualbrainError(f"tensor {full!r} has dtype {info['dtype']}, expected a float type")
        return full

    def _handle(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            from safetensors import safe_open

            try:
                # pread: tensors own their memory, so nothing keeps a whole shard mapped and resident
                try:
                    h = safe_open(str(path), framework="pt", backend="pread")
                except TypeError:  # older safetensors
                    h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise DualbrainError(f"cannot read safetensors file {path.name}: {e}") from None
            self._handles[path] = h
        return h

    def _read_row(self, full: str, j: int) -> "torch.Tensor":
        """`tensor[j]` read straight from the file (safetensors' slicing reads far more than a row)."""
        import torch

        info = self.meta[full]
        shape = info["shape"][1:]
        count = 1
        for d in shape:
            count *= d
        size = count * DTYPE_SIZES[info["dtype"]]
        with open(self.where[full], "rb") as f:
            buf = bytearray(os.pread(f.fileno(), size, info["offset"] + j * size))
        if len(buf) != size:
            raise DualbrainError(f"truncated safetensors file {self.where[full].name} reading {full!r}")
        return torch.frombuffer(buf, dtype=_torch_dtype(info["dtype"])).reshape(shape)

    def close(self) -> None:
        self._handles.clear()

    @property
    def dtype(self) -> str:
        """The checkpoint's float dtype on disk (majority of language-model tensors)."""
        counts: dict[str, int] = {}
        for name, info in self.meta.items():
            if name.startswith(self.prefix):
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
        return max(counts, key=counts.get) if counts else "F32"

    # ---- model blocks -----------------------------------------------------------------------------------
    def embed_weight(self, dtype=None) -> "torch.Tensor":
        s = self.spec
        return self.get("embed_tokens.weight", (s.vocab_size, s.hidden_size), dtype=dtype)

    def head_weights(self, dtype=None) -> dict[str, "torch.Tensor"]:
        s = self.spec
        norm = self.get("norm.weight", (s.hidden_size,), dtype=dtype)
        if s.tie_word_embeddings or "lm_head.weight" not in self.where:
            if not s.tie_word_embeddings:
                raise DualbrainError("checkpoint is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
            lm_head = self.embed_weight(dtype)
        else:
            lm_head = self.get("lm_head.weight", (s.vocab_size, s.hidden_size), absolute=True, dtype=dtype)
        return {"norm.weight": norm, "lm_head.weight": lm_head}

    def layer_weights(self, i: int, dtype=None) -> dict[str, "torch.Tensor"]:
        """All tensors of decoder layer `i` (cast to `dtype`), names relative to the layer, experts stacked."""
        return self._decoder_layer(f"{self.prefix}layers.{i}.", self.spec.layer_types[i], dtype)

    # ---- the multi-token-prediction head (top-level `mtp.*`, beside the language model) ---------------
    @property
    def has_mtp(self) -> bool:
        return MTP_PREFIX + "fc.weight" in self.where

    def mtp_weights(self, dtype=None) -> dict[str, "torch.Tensor"]:
        """The MTP head: fc, its norms (`norm.weight` is `mtp.norm`), one full-attention decoder layer
        (`layer.*`), and the model's final norm (`final_norm.weight`) and lm_head it shares."""
        out = {name: self.get(MTP_PREFIX + name, shape, absolute=True, dtype=dtype)
               for name, shape in mtp_shapes(self.spec).items()}
        out.update({f"layer.{k}": v for k, v in self._decoder_layer(MTP_PREFIX + "layers.0.", FULL, dtype).items()})
        head = self.head_weights(dtype)
        out["final_norm.weight"], out["lm_head.weight"] = head["norm.weight"], head["lm_head.weight"]
        return out

    def _decoder_layer(self, base: str, layer_type: str, dtype=None) -> dict[str, "torch.Tensor"]:
        """The tensors of one decoder layer under the absolute name `base`, experts stacked."""
        out = {}
        for name, shape in layer_shapes(self.spec, layer_type).items():
            if not name.startswith("mlp.experts."):
                out[name] = self.get(base + name, shape, absolute=True, dtype=dtype)
        if self.spec.is_moe:
            out.update(self._experts(base, dtype))
        return out

    def _experts(self, base: str, dtype=None) -> dict[str, "torch.Tensor"]:
        """Stacked gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I], from either layout.

        Filled one expert at a time, so the peak is the stacked result plus one expert, whatever
        the on-disk layout and dtype.
        """
        import torch

        s = self.spec
        e, h, inter = s.num_experts, s.hidden_size, s.moe_intermediate_size
        base = base + "mlp.experts."
        stacked = base + "gate_up_proj" in self.where
        if stacked:
            gu_name = self._checked(base + "gate_up_proj", (e, 2 * inter, h), absolute=True)
            dn_name = self._checked(base + "down_proj", (e, h, inter), absolute=True)
            first = gu_name
        elif base + "0.gate_proj.weight" in self.where:
            first = self._checked(base + "0.gate_proj.weight", (inter, h), absolute=True)
        else:
            raise DualbrainError(
                f"checkpoint is missing tensor {base + 'gate_up_proj'!r} "
                "(nor per-expert mlp.experts.N.gate_proj.weight tensors)"
            )
        dtype = dtype or _torch_dtype(self.meta[first]["dtype"])
        gate_up = torch.empty((e, 2 * inter, h), dtype=dtype)
        down = torch.empty((e, h, inter), dtype=dtype)
        for j in range(e):
            if stacked:
                gate_up[j] = self._read_row(gu_name, j)
                down[j] = self._read_row(dn_name, j)
            else:
                gate_up[j, :inter] = self.get(f"{base}{j}.gate_proj.weight", (inter, h), absolute=True)
                gate_up[j, inter:] = self.get(f"{base}{j}.up_proj.weight", (inter, h), absolute=True)
                down[j] = self.get(f"{base}{j}.down_proj.weight", (h, inter), absolute=True)
        return {"mlp.experts.gate_up_proj": gate_up, "mlp.experts.down_proj": down}

    def validate(self) -> None:
        """Check every tensor the export will read exists with the right shape (headers only)."""
        s = self.spec
        self._check("embed_tokens.weight", (s.vocab_size, s.hidden_size))
        self._check("norm.weight", (s.hidden_size,))
        if not s.tie_word_embeddings:
            self._check("lm_head.weight", (s.vocab_size, s.hidden_size), absolute=True)
        for i in range(s.num_layers):
            self._check_decoder_layer(f"{self.prefix}layers.{i}.", s.layer_types[i])
        if self.has_mtp:
            for name, shape in mtp_shapes(s).items():
                self._check(MTP_PREFIX + name, shape, absolute=True)
            self._check_decoder_layer(MTP_PREFIX + "layers.0.", FULL)
            if any(k.startswith(MTP_PREFIX + "layers.1.") for k in self.where):
                raise DualbrainError("checkpoint has more than one MTP layer (mtp.layers.1.*): dualbrain runs one")

    def _check_decoder_layer(self, base: str, layer_type: str) -> None:
        s = self.spec
        for name, shape in layer_shapes(s, layer_type).items():
            if not name.startswith("mlp.experts."):
                self._check(base + name, shape, absolute=True)
        if s.is_moe:
            base += "mlp.experts."
            e, h, inter = s.num_experts, s.hidden_size, s.moe_intermediate_size
            if base + "gate_up_proj" in self.where:
                self._check(base + "gate_up_proj", (e, 2 * inter, h), absolute=True)
                self._check(base + "down_proj", (e, h, inter), absolute=True)
            else:
                for j in range(e):
                    self._check(f"{base}{j}.gate_proj.weight", (inter, h), absolute=True)
                    self._check(f"{base}{j}.up_proj.weight", (inter, h), absolute=True)
                    self._check(f"{base}{j}.down_proj.weight", (h, inter), absolute=True)

    def _check(self, name: str, shape: tuple[int, ...], absolute: bool = False) -> None:
        full = name if absolute else self.prefix + name
        if full not in self.meta:
            raise DualbrainError(f"checkpoint is missing tensor {full!r}")
        got = tuple(self.meta[full]["shape"])
        if got != tuple(shape):
            raise DualbrainError(f"tensor {full!r} has shape {got}, the config implies {tuple(shape)}")
        if self.meta[full]["dtype"] not in FLOAT_DTYPES:
            raise DualbrainError(f"tensor {full!r} has dtype {self.meta[full]['dtype']}, expected a float type")


MTP_PREFIX = "mtp."     # the MTP head's tensors sit at the top level, not under the language model's prefix


def expected_layer_shapes(s: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of decoder layer `i`, relative to `layers.{i}.`."""
    return layer_shapes(s, s.layer_types[i])


def mtp_shapes(s: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The MTP head's own tensors (besides its decoder layer), relative to `mtp.`."""
    h = s.hidden_size
    return {"fc.weight": (h, 2 * h), "pre_fc_norm_embedding.weight": (h,), "pre_fc_norm_hidden.weight": (h,),
            "norm.weight": (h,)}


def layer_shapes(s: ModelSpec, layer_type: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a decoder layer of `layer_type`, relative to the layer."""
    h = s.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if layer_type == LINEAR:
        kd = s.linear_num_key_heads * s.linear_key_head_dim
        vd = s.linear_num_value_heads * s.linear_value_head_dim
        hv = s.linear_num_value_heads
        shapes.update({
            "linear_attn.in_proj_qkv.weight": (2 * kd + vd, h),
            "linear_attn.in_proj_z.weight": (vd, h),
            "linear_attn.in_proj_b.weight": (hv, h),
            "linear_attn.in_proj_a.weight": (hv, h),
            "linear_attn.conv1d.weight": (s.conv_dim, 1, s.linear_conv_kernel),
            "linear_attn.dt_bias": (hv,),
            "linear_attn.A_log": (hv,),
            "linear_attn.norm.weight": (s.linear_value_head_dim,),
            "linear_attn.out_proj.weight": (h, vd),
        })
    else:
        qd, kvd = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes.update({
            "self_attn.q_proj.weight": (2 * qd, h),
            "self_attn.k_proj.weight": (kvd, h),
            "self_attn.v_proj.weight": (kvd, h),
            "self_attn.o_proj.weight": (h, qd),
            "self_attn.q_norm.weight": (s.head_dim,),
            "self_attn.k_norm.weight": (s.head_dim,),
        })
    if s.is_moe:
        e, inter, sh = s.num_experts, s.moe_intermediate_size, s.shared_expert_intermediate_size
        shapes.update({
            "mlp.gate.weight": (e, h),
            "mlp.experts.gate_up_proj": (e, 2 * inter, h),
            "mlp.experts.down_proj": (e, h, inter),
            "mlp.shared_expert.gate_proj.weight": (sh, h),
            "mlp.shared_expert.up_proj.weight": (sh, h),
            "mlp.shared_expert.down_proj.weight": (h, sh),
            "mlp.shared_expert_gate.weight": (1, h),
        })
    else:
        inter = s.intermediate_size
        shapes.update({
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        })
    return shapes
