"""The export manifest: which blocks, their inputs/outputs and state tensors, dtypes, files.

Written by the exporter, read by the runtime (and later the engine builder). Reading it validates
everything a stranger's manifest could get wrong: unknown format, paths that escape the model
directory, missing or truncated files (sizes always; sha256 on request).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dualbrain.errors import DualbrainError, read_json_object
from dualbrain.runtime.blocks import KINDS, StateInfo, TensorInfo, model_blocks
from dualbrain.runtime.dtypes import FLOAT_DTYPES, QUANT_MODES
from dualbrain.runtime.spec import ModelSpec

__all__ = ["FORMAT", "VERSION", "MANIFEST", "BlockInfo", "Manifest", "StateInfo", "TensorInfo", "file_digest",
           "load_manifest", "parse_state", "parse_tensor", "safe_child", "state_name"]

FORMAT = "dualbrain-export"
# 3: every block with per-position state has a window variant (rollback) and the linked graphs take
#    logits_to_keep; 2: attention K/V appended, sequence-major (runtime.state); 1: whole present K/V
VERSION = 3
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BlockInfo:
    name: str
    kind: str                      # a runtime.blocks.KINDS name: embed | linear_attention | full_attention | head | mtp
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layer: int | None = None
    state: tuple[StateInfo, ...] = ()
    window_file: str | None = None           # the window variant: same inputs, outputs + window_outputs
    window_outputs: tuple[TensorInfo, ...] = ()

    def graph(self, window: bool = False) -> tuple[str, tuple[TensorInfo, ...]]:
        """(file, outputs) of the plain graph or of the window variant."""
        if not window:
            return self.file, self.outputs
        if self.window_file is None:
            raise KeyError(f"block {self.name} has no window variant")
        return self.window_file, self.outputs + self.window_outputs


@dataclass(frozen=True)
class Manifest:
    model: ModelSpec
    dtype: str
    opset: int
    max_context: int
    window: bool                              # window variants present (always, since version 3)
    blocks: tuple[BlockInfo, ...]
    files: dict[str, dict[str, Any]]          # relative path -> {size, sha256}
    tokenizer_files: tuple[str, ...] = ()
    linked: str | None = None                 # optional whole-model graph
    linked_window: str | None = None          # the same, linked from the blocks' window variants
    source: dict[str, Any] = field(default_factory=dict)
    quant: str | None = None                  # int8 | int4 | int4-experts | int4-weight-only (dtypes.QUANTS)
    quant_block: int | None = None            # the largest quantization block used (smaller where K needs it)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": FORMAT, "version": VERSION, **d}
        return d

    def write(self, out_dir: Path) -> None:
        (Path(out_dir) / MANIFEST).write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")

    @property
    def layers(self) -> list[BlockInfo]:
        return [b for b in self.blocks if b.layer is not None]

    @property
    def chain(self) -> list[BlockInfo]:
        """The model's own blocks in order (embed, layers, head), without side blocks."""
        return [b for b in self.blocks if not KINDS[b.kind].side]

    def side(self, kind: str) -> BlockInfo | None:
        """The side block of `kind` (e.g. the MTP head), if the export has one."""
        return next((b for b in self.blocks if b.kind == kind and KINDS[kind].side), None)

    def block(self, name: str) -> BlockInfo:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)


def state_name(block: str, name: str) -> str:
    """A layer's state tensor as the linked whole-model graph names it."""
    return f"{block}.{name}"


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def safe_child(root: Path, rel: Any, what: str) -> Path:
    """Resolve `rel` inside `root`, refusing absolute paths, `..` and symlinks that leave it."""
    if not isinstance(rel, str) or not rel:
        raise DualbrainError(f"{what}: path must be a non-empty string, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or ":" in p.parts[0]:
        raise DualbrainError(f"{what}: refusing absolute path {rel!r}")
    if ".." in p.parts:
        raise DualbrainError(f"{what}: refusing path {rel!r} that escapes the model directory")
    full = root / p
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(full), real_root]) != real_root:
        raise DualbrainError(f"{what}: refusing path {rel!r}: a symlink points outside the model directory")
    return full


def _dims(shape: Any) -> bool:
    """A shape: a list of ints and dim names."""
    return isinstance(shape, list) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in shape)


def parse_tensor(d: Any, what: str, file: str = MANIFEST) -> TensorInfo:
    """A TensorInfo from its JSON entry in `file` (the export's or the engines' manifest)."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("dtype"), str) \
            or not _dims(d.get("shape")):
        raise DualbrainError(f"{file}: malformed tensor entry in {what}")
    return TensorInfo(d["name"], d["dtype"], tuple(d["shape"]))


def parse_state(d: Any, what: str, file: str = MANIFEST) -> StateInfo:
    if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("input", "output", "dtype")) \
            or not _dims(d.get("shape")) or not isinstance(d.get("append", False), bool) \
            or (d.get("append") and d["shape"][:1] != ["past"]):   # appended states are sequence-major
        raise DualbrainError(f"{file}: malformed state entry in {what}")
    w = d.get("window_output")
    return StateInfo(d["input"], d["output"], d["dtype"], tuple(d["shape"]), w if isinstance(w, str) else None,
                     d.get("append", False))


def load_manifest(model_dir: str | os.PathLike, *, verify_hashes: bool = False) -> Manifest:
    root = Path(model_dir)
    if not root.exists():
        raise DualbrainError(f"model directory does not exist: {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise DualbrainError(f"no {MANIFEST} in {root}: not a dualbrain export")
    d = read_json_object(path)
    if d.get("format") != FORMAT:
        raise DualbrainError("manifest.json: not a dualbrain export manifest")
    if d.get("version") == 1:
        raise DualbrainError("manifest.json: this export was written by an older dualbrain (manifest version 1, "
                             "whole K/V per step); export the checkpoint again")
    if d.get("version") == 2:
        raise DualbrainError("manifest.json: this export was written by an older dualbrain (manifest version 2, "
                             "no rollback variants); re-export with this version")
    if d.get("version") != VERSION:
        raise DualbrainError(f"manifest.json: unsupported version {d.get('version')!r} (this dualbrain reads {VERSION})")
    try:
        if not isinstance(d["dtype"], str) or d["dtype"] not in FLOAT_DTYPES:
            raise DualbrainError(f"manifest.json: unknown dtype {d['dtype']!r}")
        for key, typ in (("model", dict), ("opset", int), ("max_context", int), ("window", bool),
                         ("blocks", list), ("files", dict)):
            if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
                raise DualbrainError(f"manifest.json: field {key!r} has the wrong type")
        if d["max_context"] < 1:
            raise DualbrainError("manifest.json: max_context must be positive")
        model = ModelSpec.from_json(d["model"])
        blocks = []
        for i, b in enumerate(d["blocks"]):
            if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not isinstance(b.get("kind"), str):
                raise DualbrainError(f"manifest.json: malformed block #{i}")
            layer = b.get("layer")
            if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
                raise DualbrainError(f"manifest.json: block {b['name']!r} has a bad layer index")
            if not isinstance(b.get("file"), str):
                raise DualbrainError(f"manifest.json: block {b['name']!r} has no file")
            if not isinstance(b.get("window_file"), (str, type(None))):
                raise DualbrainError(f"manifest.json: block {b['name']!r} has a bad window_file")
            blocks.append(BlockInfo(
                name=b["name"], kind=b["kind"], file=b["file"],
                inputs=tuple(parse_tensor(t, b["name"]) for t in _list(b.get("inputs"), b["name"])),
                outputs=tuple(parse_tensor(t, b["name"]) for t in _list(b.get("outputs"), b["name"])),
                layer=layer,
                state=tuple(parse_state(s, b["name"]) for s in _list(b.get("state", []), b["name"])),
                window_file=b.get("window_file"),
                window_outputs=tuple(parse_tensor(t, b["name"]) for t in _list(b.get("window_outputs", []), b["name"])),
            ))
        files = d["files"]
        tok = d.get("tokenizer_files", [])
        linked, linked_window = d.get("linked"), d.get("linked_window")
        quant = d.get("quant")          # absent in manifests written before quantized exports
        if quant is not None and quant not in QUANT_MODES:
            raise DualbrainError(f"manifest.json: unknown quant {quant!r} (this dualbrain reads "
                                 f"{', '.join(QUANT_MODES)})")
        quant_block = d.get("quant_block")
        if quant_block is not None and (not isinstance(quant_block, int) or isinstance(quant_block, bool)):
            raise DualbrainError("manifest.json: field 'quant_block' has the wrong type")
        man = Manifest(model=model, dtype=d["dtype"], opset=d["opset"], max_context=d["max_context"],
                       window=d["window"], blocks=tuple(blocks), files=files,
                       tokenizer_files=tuple(_list(tok, "tokenizer_files")),
                       linked=linked if isinstance(linked, str) else None,
                       linked_window=linked_window if isinstance(linked_window, str) else None,
                       source=d.get("source") if isinstance(d.get("source"), dict) else {}, quant=quant,
                       quant_block=quant_block)
    except KeyError as e:
        raise DualbrainError(f"manifest.json: missing field {e.args[0]!r}") from None
    check_structure(man)
    verify_files(root, man, hashes=verify_hashes)
    return man


def _list(x: Any, what: str) -> list:
    if not isinstance(x, list):
        raise DualbrainError(f"manifest.json: expected a list in {what}")
    return x


def check_structure(man: Manifest) -> None:
    """The blocks are the model's (runtime.blocks.model_blocks): kinds and layer indices in order."""
    unknown = sorted({b.kind for b in man.blocks} - set(KINDS))
    if unknown:
        raise DualbrainError(f"manifest.json: unknown block kind {unknown[0]!r} (this dualbrain knows "
                             f"{', '.join(KINDS)})")
    if [(b.kind, b.layer) for b in man.chain] != [(p.kind.name, p.layer) for p in model_blocks(man.model)]:
        raise DualbrainError("manifest.json: blocks do not match the model (embed, one block per layer, head)")
    side = [b.kind for b in man.blocks if KINDS[b.kind].side]
    if len(set(side)) != len(side):
        raise DualbrainError("manifest.json: a side block kind appears twice")
    names = [b.name for b in man.blocks]
    if len(set(names)) != len(names):
        raise DualbrainError("manifest.json: duplicate block names")


def verify_files(root: Path, man: Manifest, *, hashes: bool) -> None:
    """Every listed file exists inside `root` with its recorded size (and hash, if asked)."""
    for b in man.blocks:
        for f in (b.file, b.window_file):
            if f is not None and f not in man.files:
                raise DualbrainError(f"manifest.json: block {b.name!r} file {f!r} is not listed in files")
    for rel, info in man.files.items():
        p = safe_child(root, rel, "manifest.json")
        if not isinstance(info, dict) or not isinstance(info.get("size"), int):
            raise DualbrainError(f"manifest.json: bad file entry for {rel!r}")
        if not p.is_file():
            raise DualbrainError(f"missing file {rel} listed in manifest.json")
        size = p.stat().st_size
        if size != info["size"]:
            raise DualbrainError(f"file {rel} is {size} bytes, manifest.json records {info['size']}: truncated or modified")
        if hashes and file_digest(p)["sha256"] != info.get("sha256"):
            raise DualbrainError(f"file {rel} does not match its sha256 in manifest.json: corrupted or modified")
