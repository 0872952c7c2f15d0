"""Tiny random-weight Qwen3.5 / Qwen3.6 checkpoints in the exact published on-disk layouts.

`make_tiny(out, ...)` builds a small model with transformers' own classes, gives it random but
*non-degenerate* weights (peaked next-token distributions, sane activations, randomised norms and
Gated-DeltaNet parameters), and writes a complete checkpoint directory: sharded or single safetensors,
config.json, generation_config.json, a real byte-level BPE tokenizer.json trained deterministically on
an embedded corpus, and tokenizer_config.json with a Qwen3-style chat template.

Layouts:
  * ``layout="conditional"`` -- ``Qwen3_5ForConditionalGeneration`` / ``Qwen3_5MoeForConditionalGeneration``
    (model_type ``qwen3_5`` / ``qwen3_5_moe``): text under ``model.language_model.``, a tiny vision tower
    under ``model.visual.``, nested ``text_config``/``vision_config``, plus fake ``mtp.*`` tensors
    (published checkpoints ship a multi-token-prediction head that loaders must skip).
  * ``layout="causal"`` -- ``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM`` (``qwen3_5_text`` /
    ``qwen3_5_moe_text``): text under ``model.``.

MoE expert formats:
  * ``experts="stacked"`` (published Qwen3.5/3.6 MoE checkpoints): ``...mlp.experts.gate_up_proj`` [E, 2I, H]
    (all gate rows then all up rows) and ``...mlp.experts.down_proj`` [E, H, I], no ``.weight`` suffix.
  * ``experts="per_expert"`` (what transformers 5.x ``save_pretrained`` writes natively, reversing its
    qwen2_moe weight converter): ``...mlp.experts.{N}.{gate,up,down}_proj.weight``.

Imports torch/transformers lazily: this module is export-side only.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from dualbrain.artifacts import atomic_output_dir
from dualbrain.errors import DualbrainError
from dualbrain.exporter.tokenizer_data import CHAT_TEMPLATE, CORPUS, SPECIAL_TOKENS
from dualbrain.runtime.dtypes import FLOAT_DTYPES, torch_dtype as torch_dtype_of

FAMILIES = ("dense", "moe")
LAYOUTS = ("conditional", "causal")
EXPERT_FORMATS = ("stacked", "per_expert")

# Number of byte-level BPE tokens trained; the special tokens are appended after them (ids 989..999).
BPE_VOCAB_SIZE = 989
FULL_ATTENTION_INTERVAL = 4

# Same pre-tokenisation regex as Qwen3.5 (transformers' Qwen3_5Tokenizer).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Text-model hyper-parameters shared by all tiny presets (the vocab and layer count are filled in later).
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_conv_kernel_dim=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.02,  # not used for the text weights: `_init_tiny_weights` sets explicit scales
    # Published Qwen3.5 style: partial rotary (0.25 of head_dim 32 -> rotary_dim 8), interleaved M-RoPE
    # whose sections sum to rotary_dim / 2 = 4 (the real models use [11, 11, 10] for rotary_dim 64).
    rope_parameters=dict(
        rope_type="default",
        rope_theta=10_000_000.0,
        partial_rotary_factor=0.25,
        mrope_section=[2, 1, 1],
        mrope_interleaved=True,
    ),
)
# `attention="published"`: the attention geometry of Qwen3.6-35B-A3B (16 query heads, 2 KV heads of
# 256 dims, rotary over 64 of them) on the tiny width, for benchmarks where the KV cache's size
# relative to the attention's working memory matters (tests/benchmarks/endurance.py).
ATTENTIONS = ("tiny", "published")
PUBLISHED_ATTENTION: dict[str, Any] = dict(num_attention_heads=16, num_key_value_heads=2, head_dim=256)
PUBLISHED_MROPE_SECTION = [11, 11, 10]
TINY_DENSE: dict[str, Any] = dict(intermediate_size=96)
# `preset="mid"`: the mid-size synthetic checkpoint the CPU benchmarks use (README, issue notes): hidden
# 1024, 12 layers (every 4th full attention), 8 q / 2 KV heads of 128, GDN 8 qk / 16 v heads of 64,
# vocab 32000; MoE: 64 experts top-8 of 256 + a shared expert of 256 (about 2.8 GB in fp32).
PRESETS = ("tiny", "mid")
MID_TEXT: dict[str, Any] = dict(
    hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
    linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=4096)
MID_MROPE_SECTION = [6, 5, 5]       # rotary 32 of head_dim 128 (partial 0.25): sections sum to 16
MID_DENSE: dict[str, Any] = dict(intermediate_size=3072)
MID_MOE: dict[str, Any] = dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256,
                               shared_expert_intermediate_size=256)
MID_LAYERS, MID_VOCAB = 12, 32000
TINY_MOE: dict[str, Any] = dict(
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    router_aux_loss_coef=0.001,
)
TINY_VISION: dict[str, Any] = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    # out_hidden_size is set to the text hidden size
)

# Name -> kwargs presets, for CLIs / tests that want a short name.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "dense-conditional": dict(family="dense", layout="conditional"),
    "dense-causal": dict(family="dense", layout="causal"),
    "moe-conditional": dict(family="moe", layout="conditional", experts="stacked"),
    "moe-causal": dict(family="moe", layout="causal", experts="stacked"),
    "moe-conditional-per-expert": dict(family="moe", layout="conditional", experts="per_expert"),
    "moe-causal-per-expert": dict(family="moe", layout="causal", experts="per_expert"),
}

GENERATION_DEFAULTS: dict[str, Any] = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def build_tokenizer():
    """Train the tiny byte-level BPE tokenizer (deterministic: same tokenizer.json bytes every run)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:  # pragma: no cover - corpus edits must keep this true
        raise RuntimeError(f"BPE training produced {tok.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}")
    # Appended one at a time so the ids follow SPECIAL_TOKENS order.
    for content, special in SPECIAL_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def tokenizer_json() -> str:
    """The tokenizer.json text (pretty-printed)."""
    return build_tokenizer().to_str(pretty=True)


def special_token_ids() -> dict[str, int]:
    return {content: BPE_VOCAB_SIZE + i for i, (content, _) in enumerate(SPECIAL_TOKENS)}


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    ids = special_token_ids()
    added = {
        str(ids[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen3_5Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(directory: str | os.PathLike, *,
                    model_max_length: int = TINY_TEXT["max_position_embeddings"]) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into an existing directory."""
    d = Path(directory)
    (d / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def _check_args(family, layout, experts, dtype, shards, num_layers, vocab_size, attention="tiny", preset="tiny",
                max_position_embeddings=None):
    def bad(name, value, allowed):
        raise DualbrainError(f"make_tiny: {name}={value!r} is not one of {', '.join(allowed)}")

    if family not in FAMILIES:
        bad("family", family, FAMILIES)
    if layout not in LAYOUTS:
        bad("layout", layout, LAYOUTS)
    if experts not in EXPERT_FORMATS:
        bad("experts", experts, EXPERT_FORMATS)
    if dtype not in FLOAT_DTYPES:
        bad("dtype", dtype, FLOAT_DTYPES)
    if attention not in ATTENTIONS:
        bad("attention", attention, ATTENTIONS)
    if preset not in PRESETS:
        bad("preset", preset, PRESETS)
    if not isinstance(shards, int) or shards < 1:
        raise DualbrainError(f"make_tiny: shards must be a positive integer, got {shards!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise DualbrainError(f"make_tiny: num_layers must be a positive integer, got {num_layers!r}")
    if max_position_embeddings is not None and (not isinstance(max_position_embeddings, int)
                                                or max_position_embeddings < 1):
        raise DualbrainError(f"make_tiny: max_position_embeddings must be a positive integer, "
                             f"got {max_position_embeddings!r}")
    n_tok = BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < n_tok):
        raise DualbrainError(
            f"make_tiny: vocab_size must be an integer >= the tokenizer's {n_tok}, got {vocab_size!r}"
        )


def text_config_dict(*, family: str, num_layers: int = 4, vocab_size: int | None = None,
                     tie_embeddings: bool = False, attention: str = "tiny", preset: str = "tiny",
                     max_position_embeddings: int | None = None, hidden_size: int | None = None) -> dict[str, Any]:
    """The text-model config kwargs of a preset (model_type excluded); `max_position_embeddings`
    replaces the preset's context (the published models say 262144, most configs 32768)."""
    ids = special_token_ids()
    cfg = dict(TINY_TEXT)
    cfg["rope_parameters"] = dict(TINY_TEXT["rope_parameters"])
    if preset == "mid":
        cfg.update(MID_TEXT)
        cfg["rope_parameters"]["mrope_section"] = list(MID_MROPE_SECTION)
    if attention == "published":
        cfg.update(PUBLISHED_ATTENTION)
        cfg["rope_parameters"]["mrope_section"] = list(PUBLISHED_MROPE_SECTION)
    if preset == "mid":
        cfg.update(MID_DENSE if family == "dense" else MID_MOE)
    else:
        cfg.update(TINY_DENSE if family == "dense" else TINY_MOE)
    cfg.update(
        vocab_size=vocab_size or (BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)),
        num_hidden_layers=num_layers,
        layer_types=[
            "full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention"
            for i in range(num_layers)
        ],
        tie_word_embeddings=tie_embeddings,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if max_position_embeddings is not None:
        cfg["max_position_embeddings"] = max_position_embeddings
    if hidden_size is not None:      # another width (a pair's small model); head and expert sizes stay
        cfg["hidden_size"] = hidden_size
    return cfg


def _build_model(family: str, layout: str, text_cfg: dict[str, Any], tie_embeddings: bool):
    import transformers as tf

    ids = special_token_ids()
    if family == "dense":
        TextConfig, Config = tf.Qwen3_5TextConfig, tf.Qwen3_5Config
        Causal, Cond = tf.Qwen3_5ForCausalLM, tf.Qwen3_5ForConditionalGeneration
    else:
        TextConfig, Config = tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeConfig
        Causal, Cond = tf.Qwen3_5MoeForCausalLM, tf.Qwen3_5MoeForConditionalGeneration
    if layout == "causal":
        return Causal(TextConfig(**text_cfg))
    vision = dict(TINY_VISION, out_hidden_size=text_cfg["hidden_size"])
    config = Config(
        text_config=text_cfg,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )
    return Cond(config)


def _tiny_init(name: str, shape: tuple[int, ...], normal, g, tie_embeddings: bool = False):
    """One text weight of a tiny model, by what it is (also the MTP head's: `_mtp_tensors`)."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("embed_tokens.weight"):
        return normal(shape, 0.5 if tie_embeddings else 1.0)
    if name == "lm_head.weight":
        return normal(shape, 0.6)
    if name.endswith("linear_attn.norm.weight"):  # gated RMSNorm: plain `w * x`, init 1
        return normal(shape, 0.1, 1.0)
    if name.endswith("norm.weight") or ".pre_fc_norm_" in name:  # zero-centred `(1 + w) * x` RMSNorms
        return normal(shape, 0.1)
    if leaf == "A_log":
        return torch.empty(shape).uniform_(1.0, 16.0, generator=g).log_()
    if leaf == "dt_bias":
        return normal(shape, 0.5, 1.0)
    if name.endswith("conv1d.weight"):  # [C, 1, K]
        return normal(shape, 1.0 / math.sqrt(shape[-1]))
    if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
        return normal(shape, 1.0 / math.sqrt(shape[2]))
    if name.endswith("experts.down_proj"):  # [E, H, I]
        return normal(shape, 0.5 / math.sqrt(shape[2]))
    if name.endswith("mlp.gate.weight"):  # router [E, H]: peaked routing
        return normal(shape, 2.0 / math.sqrt(shape[1]))
    if len(shape) == 2:  # nn.Linear [out, in]
        out_proj = any(s in name for s in ("o_proj", "down_proj", "out_proj"))
        return normal(shape, (0.5 if out_proj else 1.0) / math.sqrt(shape[1]))
    raise RuntimeError(f"no tiny init rule for {name} {shape}")  # pragma: no cover


def _init_tiny_weights(model, seed: int, tie_embeddings: bool) -> None:
    """Explicit, seeded, non-degenerate initialisation of the text weights (vision tower left as built).

    Scales are chosen so that the residual stream stays O(1) per layer, routing is peaked, and the final
    logits have a spread of several nats (peaked next-token distributions, clear top-1 margins).
    """
    import torch

    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    for name, p in model.named_parameters():
        if "visual" in name:
            continue
        new = _tiny_init(name, tuple(p.shape), normal, g, tie_embeddings)
        with torch.no_grad():
            p.copy_(new.to(p.dtype))
    if tie_embeddings:
        model.tie_weights()


# ------------------------------------------------------------------------------------------------
# Safetensors post-processing: expert format, mtp head, sharding
# ------------------------------------------------------------------------------------------------
_PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


def _to_stacked(tensors: dict[str, Any]) -> dict[str, Any]:
    """Per-expert `experts.{N}.{gate,up,down}_proj.weight` -> stacked `experts.gate_up_proj`/`down_proj`."""
    import torch

    groups: dict[str, dict[str, dict[int, Any]]] = {}
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        m = _PER_EXPERT_RE.match(k)
        if m:
            groups.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["idx"])] = v
        else:
            out[k] = v
    for prefix, projs in groups.items():
        n = len(projs["gate_proj"])
        gate = torch.stack([projs["gate_proj"][i] for i in range(n)])  # [E, I, H]
        up = torch.stack([projs["up_proj"][i] for i in range(n)])  # [E, I, H]
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()  # [E, 2I, H]
        out[f"{prefix}.down_proj"] = torch.stack([projs["down_proj"][i] for i in range(n)]).contiguous()
    return out


def _to_per_expert(tensors: dict[str, Any]) -> dict[str, Any]:
    """Stacked `experts.gate_up_proj` [E,2I,H] / `experts.down_proj` [E,H,I] -> per-expert `.weight`s."""
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix = k[: -len(".gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def _mtp_tensors(spec, torch_dtype, seed: int) -> dict[str, Any]:
    """A multi-token-prediction head in the published layout (the checkpoint reader's own shapes:
    `mtp_shapes` + one full-attention decoder layer, stacked experts for MoE), random with the spreads
    of the model's own weights (`_tiny_init`), so its logits are peaked, not near-uniform."""
    import torch

    from dualbrain.exporter.checkpoint import MTP_PREFIX, layer_shapes, mtp_shapes
    from dualbrain.runtime.spec import FULL

    g = torch.Generator().manual_seed(int(seed) * 31 + 5)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    shapes = {MTP_PREFIX + k: v for k, v in mtp_shapes(spec).items()}
    shapes.update({f"{MTP_PREFIX}layers.0.{k}": v for k, v in layer_shapes(spec, FULL).items()})
    return {k: _tiny_init(k, shape, normal, g).to(torch_dtype) for k, shape in shapes.items()}


def _read_all_safetensors(d: Path) -> dict[str, Any]:
    """Load every tensor saved in `d` and delete the files (they are rewritten by `_write_shards`)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    files = sorted(d.glob("*.safetensors"))
    for f in files:
        tensors.update(load_file(str(f)))
        f.unlink()
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()
    return tensors


def _write_shards(d: Path, tensors: dict[str, Any], shards: int) -> None:
    """Write `model.safetensors`, or exactly `shards` `model-0000X-of-0000N.safetensors` + index."""
    from safetensors.torch import save_file

    keys = sorted(tensors)
    nbytes = {k: tensors[k].numel() * tensors[k].element_size() for k in keys}
    total = sum(nbytes.values())
    meta = {"format": "pt"}
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(d / "model.safetensors"), metadata=meta)
        return
    if shards > len(keys):
        raise DualbrainError(f"make_tiny: shards={shards} exceeds the number of tensors ({len(keys)})")
    # Contiguous split of the sorted keys into `shards` groups of roughly equal byte size, none empty.
    target = total / shards
    groups: list[list[str]] = []
    i, acc = 0, 0
    for g in range(shards):
        group: list[str] = []
        while i < len(keys):
            if g < shards - 1 and group and (acc >= target * (g + 1) or len(keys) - i <= shards - 1 - g):
                break
            group.append(keys[i])
            acc += nbytes[keys[i]]
            i += 1
        groups.append(group)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, str(d / name), metadata=meta)
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def make_tiny(
    out: str | os.PathLike,
    *,
    family: str = "dense",
    layout: str = "conditional",
    experts: str = "stacked",
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    tie_embeddings: bool = False,
    attention: str = "tiny",
    preset: str = "tiny",
    max_position_embeddings: int | None = None,
    hidden_size: int | None = None,
) -> Path:
    """Write a tiny random-weight checkpoint directory to `out` (atomically) and return its path.

    `experts` only matters for ``family="moe"``. `vocab_size` (default: the tokenizer's 1000) may be
    larger than the tokenizer (padded embedding rows, as in the published models). `preset="mid"`
    writes the mid-size benchmark model instead (12 layers and vocab 32000 unless given).
    `max_position_embeddings` sets the config's context (default: the preset's, 512 for tiny), which
    an export serves and engine builds size their profiles by.
    """
    if num_layers is None:
        num_layers = MID_LAYERS if preset == "mid" else 4
    if vocab_size is None and preset == "mid":
        vocab_size = MID_VOCAB
    _check_args(family, layout, experts, dtype, shards, num_layers, vocab_size, attention, preset,
                max_position_embeddings)
    if hidden_size is not None and (not isinstance(hidden_size, int) or hidden_size < 8):
        raise DualbrainError(f"make_tiny: hidden_size must be an integer >= 8, got {hidden_size!r}")
    import torch

    torch_dtype = torch_dtype_of(dtype)
    text_cfg = text_config_dict(family=family, num_layers=num_layers, vocab_size=vocab_size,
                                tie_embeddings=tie_embeddings, attention=attention, preset=preset,
                                max_position_embeddings=max_position_embeddings, hidden_size=hidden_size)

    out = Path(out)
    torch.manual_seed(seed)  # vision tower and anything left to transformers' init
    model = _build_model(family, layout, text_cfg, tie_embeddings)
    _init_tiny_weights(model, seed, tie_embeddings)
    return write_checkpoint(model.to(torch_dtype), out, family=family, layout=layout, experts=experts, shards=shards,
                            seed=seed)


def write_checkpoint(model, out: str | os.PathLike, *, family: str, layout: str, experts: str = "stacked",
                     shards: int = 1, seed: int = 0, mtp: dict[str, Any] | None = None) -> Path:
    """Write a transformers Qwen3.5 / Qwen3.6 model (as `_build_model` makes it) to `out` atomically, in
    the published layout: safetensors, configs, the tiny tokenizer. The conditional layout gets an MTP
    head: `mtp` (published names, `mtp.*`) or a random one."""
    from transformers import GenerationConfig

    ids = special_token_ids()
    torch_dtype = next(model.parameters()).dtype
    out = Path(out)
    with atomic_output_dir(out) as part:
        model = model.eval()
        model.config.use_cache = True
        model.save_pretrained(str(part), safe_serialization=True, max_shard_size="10GB")

        tensors = _read_all_safetensors(part)
        # transformers 5.x save_pretrained writes MoE experts per-expert (the reverse of its qwen2_moe
        # weight converter); normalise to stacked, add the mtp head, then emit the requested format.
        tensors = _to_stacked(tensors)
        if layout == "conditional":
            from dualbrain.runtime.spec import ModelSpec

            tensors.update({k: v.to(torch_dtype) for k, v in mtp.items()} if mtp is not None
                           else _mtp_tensors(ModelSpec.from_dir(part), torch_dtype, seed))
        if family == "moe" and experts == "per_expert":
            tensors = _to_per_expert(tensors)
        _write_shards(part, tensors, shards)

        GenerationConfig(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"],
            **GENERATION_DEFAULTS,
        ).save_pretrained(str(part))
        text = getattr(model.config, "text_config", model.config)
        write_tokenizer(part, model_max_length=text.max_position_embeddings)
        for stray in ("chat_template.jinja", "special_tokens_map.json"):
            (part / stray).unlink(missing_ok=True)
    return out


__all__ = [
    "make_tiny",
    "write_checkpoint",
    "build_tokenizer",
    "tokenizer_json",
    "tokenizer_config",
    "write_tokenizer",
    "special_token_ids",
    "text_config_dict",
    "TINY_PRESETS",
    "TINY_TEXT",
    "TINY_DENSE",
    "TINY_MOE",
    "TINY_VISION",
    "GENERATION_DEFAULTS",
]
