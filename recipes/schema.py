"""Engine build recipes: strict TOML schema as frozen dataclasses.

A recipe says which GPU an engine set is for and how to build it::

    name = "rtx4090-fp16"
    target = "rtx4090"                  # rtx4090 | rtx5090 | orin | h100
    flavour = "tensorrt-rtx"            # tensorrt-rtx | tensorrt (enterprise)
    compute_capabilities = [8.9]        # must include the target's
    precision = "float16"               # the export's precision: float32 | float16 | bfloat16 |
                                        # int4-weight-only | fp8 (the last two need `export --quant`)
    linked = false                      # one engine per block (true: one for the whole model; not yet)
    timing_cache = true                 # keep ENGINES/timing.cache (enterprise; a no-op in TensorRT-RTX)
    optimization_level = 3              # builder optimization level 0..5
    workspace_mib = 4096                # workspace memory pool limit

    [profile]                           # shapes the engines accept
    min_batch = 1
    opt_batch = 1
    max_batch = 4
    opt_prefill = 512                   # tokens per prefill call (seq of the prefill profile)
    max_prefill = 512                   # the most new positions per call: the runtime prefills longer
                                        # prompts in chunks of at most this (engines.json max_new_positions)
    opt_context = 2048                  # past + seq (KV cache length)
    max_context = 8192                  # clamped to the export's max_context at build time
    decode_profile = true               # a second profile with seq = 1 (up to 2) for decode

Unknown keys, wrong types and out-of-range values are refused with a one-line DualbrainError that
names the recipe file, the key and its table.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dualbrain.errors import DualbrainError
from dualbrain.plugins.tensorrt import FLAVOURS as _FLAVOUR_MODULES
from dualbrain.runtime.dtypes import FLOAT_DTYPES, QUANT_BASE_DTYPES, TENSORRT_QUANT_MODES

RECIPE_DIR = Path(__file__).resolve().parent
TARGETS = {"rtx4090": "8.9", "rtx5090": "12.0", "orin": "8.7", "h100": "9.0"}
FLAVOURS = tuple(_FLAVOUR_MODULES)
# TensorRT-RTX's ComputeCapability enum (1.7): no Orin (8.7), no Hopper (9.0), no Blackwell DC (10.0).
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "11.0", "12.0", "12.1")
# fp8 is a recipe precision `dualbrain export --quant` cannot make yet (it needs calibration)
QUANTIZED = (*TENSORRT_QUANT_MODES, "fp8")
PRECISIONS = (*FLOAT_DTYPES, *QUANTIZED)
SUPPORTED_QUANT = TENSORRT_QUANT_MODES


@dataclass(frozen=True)
class Profile:
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    opt_prefill: int = 128
    max_prefill: int = 512
    opt_context: int = 1024
    max_context: int = 4096
    decode_profile: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str
    flavour: str
    compute_capabilities: tuple[str, ...]
    precision: str
    profile: Profile
    description: str = ""
    linked: bool = False
    timing_cache: bool = True
    optimization_level: int = 3
    workspace_mib: int = 4096
    source: str = ""                   # file the recipe came from (for messages); not a TOML key

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_capabilities"] = list(self.compute_capabilities)
        return d

    def check_precision(self, export_dtype: str, export_quant: str | None = None) -> None:
        """Refuse an export whose precision is not the one this recipe builds.

        A quantized recipe (int4-weight-only) takes an export quantized that way on top of a GPU
        base dtype (float16 or bfloat16: scales and activations); a plain-dtype recipe takes an
        unquantized export of exactly its dtype."""
        label = f"recipe {self.name}"
        have = export_dtype + (f" + {export_quant}" if export_quant else "")
        if export_quant and export_quant not in TENSORRT_QUANT_MODES:
            raise DualbrainError(f"{label}: this export is {have}; --quant {export_quant} exports run on ONNX Runtime "
                                 "(QMoE experts); TensorRT recipes take an unquantized export or --quant "
                                 f"{' / '.join(TENSORRT_QUANT_MODES)}")
        if self.precision in QUANTIZED:
            if self.precision not in SUPPORTED_QUANT:
                raise DualbrainError(
                    f"{label} expects a {self.precision} export, made with `dualbrain export --quant "
                    f"{self.precision}`, which dualbrain does not support yet; this export is {have}")
            if export_quant != self.precision or export_dtype not in QUANT_BASE_DTYPES:
                raise DualbrainError(
                    f"{label} expects a {self.precision} export, this export is {have} (export again with "
                    f"`dualbrain export --dtype float16|bfloat16 --quant {self.precision}`)")
            return
        if export_quant:
            raise DualbrainError(f"{label} expects an unquantized {self.precision} export, this export is {have} "
                                 f"(export again without --quant, or pick a {export_quant} recipe)")
        if export_dtype != self.precision:
            raise DualbrainError(f"{label} expects a {self.precision} export, this export is {export_dtype} "
                                 f"(export again with --dtype {self.precision}, or pick a {export_dtype} recipe)")


_INT, _BOOL, _STR = "an integer", "true or false", "a string"


def _typecheck(where: str, key: str, table: str, value: Any, kind: str) -> None:
    ok = {_INT: isinstance(value, int) and not isinstance(value, bool),
          _BOOL: isinstance(value, bool),
          _STR: isinstance(value, str)}[kind]
    if not ok:
        label = f" in [{table}]" if table else ""
        raise DualbrainError(f"{where}: key '{key}'{label} must be {kind}, got {_toml_type(value)} {value!r}")


def _toml_type(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _table(where: str, table: str, d: dict, spec: dict[str, str]) -> dict:
    label = f"[{table}]" if table else "the top level"
    for k in d:
        if k not in spec:
            raise DualbrainError(f"{where}: unknown key '{k}' in {label} (allowed: {', '.join(spec)})")
    for k, kind in spec.items():
        if k in d and kind not in ("table", "list"):
            _typecheck(where, k, table, d[k], kind)
    return d


def _cc(where: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise DualbrainError(f"{where}: key 'compute_capabilities' must be a list of numbers like 8.9, got {v!r}")
    try:
        s = f"{float(v):.1f}"
    except ValueError:
        raise DualbrainError(f"{where}: key 'compute_capabilities' has a bad entry {v!r}") from None
    if s not in COMPUTE_CAPABILITIES:
        raise DualbrainError(f"{where}: key 'compute_capabilities' has unknown compute capability {s} "
                             f"(known: {', '.join(COMPUTE_CAPABILITIES)})")
    return s


TOP = {"name": _STR, "description": _STR, "target": _STR, "flavour": _STR, "compute_capabilities": "list",
       "precision": _STR, "linked": _BOOL, "timing_cache": _BOOL, "optimization_level": _INT,
       "workspace_mib": _INT, "profile": "table"}
PROFILE = {f.name: (_BOOL if f.type in ("bool", bool) else _INT) for f in fields(Profile)}
REQUIRED = ("name", "target", "flavour", "compute_capabilities", "precision", "profile")


def parse_recipe(d: dict, where: str) -> Recipe:
    """Validate a parsed TOML document; `where` names it in messages (e.g. `recipe rtx4090-fp16.toml`)."""
    _table(where, "", d, TOP)
    for k in REQUIRED:
        if k not in d:
            raise DualbrainError(f"{where}: missing key '{k}'")
    if not isinstance(d["profile"], dict):
        raise DualbrainError(f"{where}: key 'profile' must be a table [profile]")
    p = _table(where, "profile", d["profile"], PROFILE)
    prof = Profile(**p)

    def bad(key, table, msg):
        label = f" in [{table}]" if table else ""
        raise DualbrainError(f"{where}: key '{key}'{label} {msg}")

    if d["target"] not in TARGETS:
        bad("target", "", f"must be one of {', '.join(TARGETS)}, got {d['target']!r}")
    if d["flavour"] not in FLAVOURS:
        bad("flavour", "", f"must be one of {', '.join(FLAVOURS)}, got {d['flavour']!r}")
    if d["precision"] not in PRECISIONS:
        bad("precision", "", f"must be one of {', '.join(PRECISIONS)}, got {d['precision']!r}")
    ccs = d["compute_capabilities"]
    if not isinstance(ccs, list) or not ccs:
        bad("compute_capabilities", "", f"must be a non-empty list like [8.9], got {ccs!r}")
    ccs = tuple(dict.fromkeys(_cc(where, v) for v in ccs))
    want = TARGETS[d["target"]]
    if want not in ccs:
        bad("compute_capabilities", "", f"must include {want}, the compute capability of target {d['target']}")
    if d["flavour"] == "tensorrt-rtx":
        unsupported = [c for c in ccs if c not in RTX_COMPUTE_CAPABILITIES]
        if unsupported:
            bad("compute_capabilities", "", f"has {', '.join(unsupported)}, which TensorRT-RTX cannot target "
                f"(it supports {', '.join(RTX_COMPUTE_CAPABILITIES)}): use flavour = \"tensorrt\"")
    level = d.get("optimization_level", 3)
    if isinstance(level, int) and not 0 <= level <= 5:
        bad("optimization_level", "", f"must be between 0 and 5, got {level}")
    ws = d.get("workspace_mib", 4096)
    if isinstance(ws, int) and ws < 1:
        bad("workspace_mib", "", f"must be >= 1, got {ws}")
    for k in ("min_batch", "opt_batch", "max_batch", "opt_prefill", "max_prefill", "opt_context", "max_context"):
        if getattr(prof, k) < 1:
            bad(k, "profile", f"must be >= 1, got {getattr(prof, k)}")
    for lo, hi in (("min_batch", "opt_batch"), ("opt_batch", "max_batch"), ("opt_prefill", "max_prefill"),
                   ("opt_context", "max_context"), ("max_prefill", "max_context")):
        if getattr(prof, lo) > getattr(prof, hi):
            bad(lo, "profile", f"({getattr(prof, lo)}) must be <= {hi} ({getattr(prof, hi)})")
    return Recipe(name=d["name"], target=d["target"], flavour=d["flavour"], compute_capabilities=ccs,
                  precision=d["precision"], profile=prof, description=d.get("description", ""),
                  linked=d.get("linked", False), timing_cache=d.get("timing_cache", True),
                  optimization_level=level, workspace_mib=ws, source=where.removeprefix("recipe "))


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with dualbrain."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A bundled recipe by name (``rtx4090-fp16``) or a TOML file by path."""
    s = str(name_or_path)
    p = Path(s)
    looks_like_path = s.endswith(".toml") or os.sep in s or "/" in s
    if not looks_like_path:
        if s not in bundled_recipes():
            raise DualbrainError(f"unknown recipe {s!r}: give a path to a .toml file or one of "
                                 f"{', '.join(bundled_recipes())}")
        p = RECIPE_DIR / f"{s}.toml"
    where = f"recipe {p.name}"
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DualbrainError(f"recipe file not found: {p}") from None
    except IsADirectoryError:
        raise DualbrainError(f"recipe path is a directory: {p}") from None
    except UnicodeDecodeError:
        raise DualbrainError(f"{where}: not UTF-8 text") from None
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DualbrainError(f"{where}: invalid TOML: {e}") from None
    return parse_recipe(d, where)
