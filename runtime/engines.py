"""The engine manifest (`engines.json`): what `dualbrain build` wrote, as one type.

Written by the builder (`recipes.build`), read and checked by the TensorRT backend before anything
needs a GPU: engines built from another export, with another TensorRT flavour or version, or for
another GPU are refused with a message that says which.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dualbrain.errors import DualbrainError, read_json_object
from dualbrain.runtime.blocks import StateInfo, TensorInfo
from dualbrain.plugins.tensorrt import FLAVOUR_LABELS
from dualbrain.runtime.manifest import Manifest, parse_state, parse_tensor

ENGINE_MANIFEST = "engines.json"
ENGINE_FORMAT = "dualbrain-engines"
ENGINE_VERSION = 1


@dataclass(frozen=True)
class EngineVariant:
    """An engine built from a block's window variant (same inputs; outputs + the per-position states)."""
    engine: str
    size: int
    sha256: str
    build_seconds: float
    plugins: tuple[dict, ...]


@dataclass(frozen=True)
class EngineBlock:
    name: str
    kind: str
    layer: int | None
    onnx: str                      # the export's graph it was built from
    engine: str                    # file in the engines directory
    size: int
    sha256: str
    build_seconds: float
    plugins: tuple[dict, ...]      # plugin layers found when parsing (recipes.build._Worker.plugin_layers)
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    state: tuple[StateInfo, ...]
    window: EngineVariant | None = None

    def engines(self) -> dict[str, "EngineBlock | EngineVariant"]:
        """Engine entries by graph name: the block's, and its window variant's as `{name}.window`."""
        return {self.name: self, **({f"{self.name}.window": self.window} if self.window else {})}


@dataclass(frozen=True)
class EngineManifest:
    flavour: str                   # tensorrt-rtx | tensorrt
    tensorrt_version: str
    compute_capabilities: tuple[str, ...]
    target: str
    recipe: dict[str, Any]
    profiles: tuple[dict, ...]     # {"name", "dims": {dim: [min, opt, max]}}
    timing_cache: str | None
    export: dict[str, Any]         # path, dtype, max_context, window, manifest_sha256, model
    blocks: tuple[EngineBlock, ...]
    # What one call may feed the engines (the prefill profile's maxima; the decode profile has the
    # same batch and context): at most `max_batch` rows, `max_new_positions` new positions per row
    # (prefill longer prompts in chunks of at most this), `max_context` positions per row in all.
    max_batch: int = 0
    max_new_positions: int = 0
    max_context: int = 0
    build: dict[str, Any] = field(default_factory=dict)   # {"seconds", "worker_peak_rss_mib"} of the build

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps({"format": ENGINE_FORMAT, "version": ENGINE_VERSION, **asdict(self)}))

    def write(self, engines_dir: Path) -> dict[str, Any]:
        d = self.to_json()
        (Path(engines_dir) / ENGINE_MANIFEST).write_text(json.dumps(d, indent=1), encoding="utf-8")
        return d

    @classmethod
    def read(cls, engines_dir: str | Path) -> "EngineManifest":
        path = Path(engines_dir) / ENGINE_MANIFEST
        if not path.is_file():
            raise DualbrainError(f"no {ENGINE_MANIFEST} in {engines_dir}: not a `dualbrain build` output")
        em = read_json_object(path)
        if em.get("format") != ENGINE_FORMAT:
            raise DualbrainError(f"{ENGINE_MANIFEST}: not a dualbrain engine manifest")
        if em.get("version") != ENGINE_VERSION:
            raise DualbrainError(f"{ENGINE_MANIFEST}: unsupported version {em.get('version')!r}")
        for key, typ in (("flavour", str), ("tensorrt_version", str), ("compute_capabilities", list),
                         ("blocks", list), ("export", dict)):
            if not isinstance(em.get(key), typ):
                raise DualbrainError(f"{ENGINE_MANIFEST}: field {key!r} is missing or has the wrong type")
        profiles = tuple(p for p in em.get("profiles") or () if isinstance(p, dict))
        # a manifest written before the limits were recorded: its prefill profile says the same
        limits = call_limits(profiles)
        for key in limits:
            if isinstance(em.get(key), int) and not isinstance(em.get(key), bool):
                limits[key] = em[key]
        return cls(flavour=em["flavour"], tensorrt_version=em["tensorrt_version"],
                   compute_capabilities=tuple(str(c) for c in em["compute_capabilities"]),
                   target=str(em.get("target", "")), recipe=_dict(em.get("recipe")), profiles=profiles,
                   timing_cache=em.get("timing_cache") if isinstance(em.get("timing_cache"), str) else None,
                   export=em["export"], blocks=tuple(_block(b, i) for i, b in enumerate(em["blocks"])),
                   build=_dict(em.get("build")), **limits)

    def check(self, manifest: Manifest, *, flavour: str, version: str, device_capability) -> None:
        """Refuse engines built from another export, with another TensorRT, or for another GPU."""
        if self.export.get("dtype") != manifest.dtype:
            raise DualbrainError(f"engines were built from a {self.export.get('dtype')} export, this export is "
                                 f"{manifest.dtype}")
        if [b.name for b in self.blocks] != [b.name for b in manifest.blocks]:
            raise DualbrainError("engines were built from a different export (block list differs): rebuild them")
        for b, eb in zip(manifest.blocks, self.blocks):
            if (eb.inputs, eb.outputs) != (b.inputs, b.outputs):
                raise DualbrainError(f"engine for block {b.name} has other inputs/outputs than this export: rebuild")
        if self.flavour != flavour:
            raise DualbrainError(f"engines were built with {FLAVOUR_LABELS.get(self.flavour, self.flavour)}, "
                                 f"this process uses {FLAVOUR_LABELS.get(flavour, flavour)}")
        if self.tensorrt_version != version:
            raise DualbrainError(f"engines were built with {FLAVOUR_LABELS.get(flavour, flavour)} "
                                 f"{self.tensorrt_version}, installed is {version}: rebuild them with `dualbrain build`")
        cc = capability_str(device_capability)
        if cc not in self.compute_capabilities:
            raise DualbrainError(f"engines target compute capability {', '.join(self.compute_capabilities)}, "
                                 f"this GPU is {cc}: build with a recipe for this GPU")


def call_limits(profiles) -> dict[str, int]:
    """{max_batch, max_new_positions, max_context} from the profiles' maxima of batch, seq and total
    (the prefill profile's: every profile shares its batch and context); 0 where a profile lacks one."""
    dims = next((p.get("dims") for p in profiles if p.get("name") == "prefill"), None) or {}

    def top(d):
        v = dims.get(d)
        return int(v[2]) if isinstance(v, list) and len(v) == 3 and isinstance(v[2], int) else 0
    return {"max_batch": top("batch"), "max_new_positions": top("seq"), "max_context": top("total")}


def capability_str(cc) -> str:
    """"8.9" from (8, 9), "8.9" or 8.9."""
    if isinstance(cc, (tuple, list)):
        return f"{int(cc[0])}.{int(cc[1])}"
    return f"{float(cc):.1f}"


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _block(d: Any, i: int) -> EngineBlock:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("engine"), str) \
            or not isinstance(d.get("size"), int) or isinstance(d.get("size"), bool):
        raise DualbrainError(f"{ENGINE_MANIFEST}: malformed block #{i}")
    where = d["name"]

    def entries(key):
        v = d.get(key, [])
        if not isinstance(v, list):
            raise DualbrainError(f"{ENGINE_MANIFEST}: expected a list in {where}.{key}")
        return v
    layer = d.get("layer")
    return EngineBlock(
        name=d["name"], kind=str(d.get("kind", "")), layer=layer if isinstance(layer, int) else None,
        onnx=str(d.get("onnx", "")), engine=d["engine"], size=d["size"], sha256=str(d.get("sha256", "")),
        build_seconds=float(d["build_seconds"]) if isinstance(d.get("build_seconds"), (int, float)) else 0.0,
        plugins=tuple(p for p in entries("plugins") if isinstance(p, dict)),
        inputs=tuple(parse_tensor(t, where, ENGINE_MANIFEST) for t in entries("inputs")),
        outputs=tuple(parse_tensor(t, where, ENGINE_MANIFEST) for t in entries("outputs")),
        state=tuple(parse_state(s, where, ENGINE_MANIFEST) for s in entries("state")),
        window=_variant(d.get("window"), where))


def _variant(d: Any, where: str) -> EngineVariant | None:
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("engine"), str) or not isinstance(d.get("size"), int) \
            or isinstance(d.get("size"), bool) or not isinstance(d.get("plugins", []), list):
        raise DualbrainError(f"{ENGINE_MANIFEST}: malformed window engine of block {where}")
    return EngineVariant(d["engine"], d["size"], str(d.get("sha256", "")),
                         float(d["build_seconds"]) if isinstance(d.get("build_seconds"), (int, float)) else 0.0,
                         tuple(p for p in d.get("plugins", []) if isinstance(p, dict)))
