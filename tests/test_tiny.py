"""Tiny random-weight checkpoints: layouts, expert formats, sharding, loadability, non-degeneracy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from dualbrain.errors import DualbrainError  # noqa: E402
from dualbrain.exporter.tiny import make_tiny, special_token_ids  # noqa: E402

CLASSES = {
    ("dense", "conditional"): "Qwen3_5ForConditionalGeneration",
    ("dense", "causal"): "Qwen3_5ForCausalLM",
    ("moe", "conditional"): "Qwen3_5MoeForConditionalGeneration",
    ("moe", "causal"): "Qwen3_5MoeForCausalLM",
}
MODEL_TYPES = {
    ("dense", "conditional"): "qwen3_5",
    ("dense", "causal"): "qwen3_5_text",
    ("moe", "conditional"): "qwen3_5_moe",
    ("moe", "causal"): "qwen3_5_moe_text",
}
# (family, layout, experts) -- experts only varies for MoE
VARIANTS = [
    ("dense", "conditional", "stacked"),
    ("dense", "causal", "stacked"),
    ("moe", "conditional", "stacked"),
    ("moe", "conditional", "per_expert"),
    ("moe", "causal", "stacked"),
    ("moe", "causal", "per_expert"),
]

MIN_MEAN_MAX_PROB = 0.2
MIN_MEDIAN_MARGIN = 0.3


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {v: make_tiny(root / "-".join(v), family=v[0], layout=v[1], experts=v[2]) for v in VARIANTS}


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 989, (4, 24), generator=g)


_logits_cache: dict = {}


def _load(path: Path, family: str, layout: str):
    cls = getattr(transformers, CLASSES[family, layout])
    return cls.from_pretrained(str(path)).eval()


def _logits(path: Path, family: str, layout: str, x):
    key = (str(path), family, layout)
    if key not in _logits_cache:
        model = _load(path, family, layout)
        with torch.no_grad():
            _logits_cache[key] = model(input_ids=x).logits.float()
    return _logits_cache[key]


def _keys(path: Path) -> list[str]:
    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys.extend(h.keys())
    return keys


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_layout_and_keys(tiny_dirs, variant):
    family, layout, experts = variant
    path = tiny_dirs[variant]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPES[family, layout]
    assert cfg["architectures"] == [CLASSES[family, layout]]
    text_cfg = cfg["text_config"] if layout == "conditional" else cfg
    assert text_cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert text_cfg["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert sum(text_cfg["rope_parameters"]["mrope_section"]) == 32 * 0.25 / 2
    ids = special_token_ids()
    assert text_cfg["eos_token_id"] == ids["<|im_end|>"]
    assert text_cfg["pad_token_id"] == ids["<|endoftext|>"]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["top_k"]) == (True, 0.6, 0.95, 20)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["pad_token"] == "<|endoftext|>"
    assert "<|im_start|>" in tok_cfg["chat_template"]

    keys = _keys(path)
    text = "model.language_model." if layout == "conditional" else "model."
    assert f"{text}embed_tokens.weight" in keys
    assert f"{text}layers.0.linear_attn.A_log" in keys
    assert f"{text}layers.3.self_attn.q_proj.weight" in keys
    assert "lm_head.weight" in keys
    if layout == "conditional":
        assert any(k.startswith("model.visual.") for k in keys)
        assert "mtp.fc.weight" in keys and any(k.startswith("mtp.layers.0.") for k in keys)
    else:
        assert not any(k.startswith(("model.language_model.", "model.visual.", "mtp.")) for k in keys)
    if family == "moe":
        stacked = [k for k in keys if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))
                   and not k.startswith("mtp.")]
        per_expert = [k for k in keys if ".mlp.experts.0." in k and not k.startswith("mtp.")]
        mtp_experts = [k for k in keys if k.startswith("mtp.layers.0.mlp.experts.")]
        if layout == "conditional":  # the mtp head follows the same expert format
            assert len(mtp_experts) == (2 if experts == "stacked" else 3 * 16)
        if experts == "stacked":
            assert len(stacked) == 8 and not per_expert
            with safe_open(str(path / "model.safetensors"), "pt") as h:
                def shape(k):
                    return list(h.get_slice(f"{text}layers.0.mlp.experts.{k}").get_shape())
                assert shape("gate_up_proj") == [16, 64, 64]
                assert shape("down_proj") == [16, 64, 32]
        else:
            assert not stacked and len(per_expert) == 3 * 4
            with safe_open(str(path / "model.safetensors"), "pt") as h:
                def shape(k):
                    return list(h.get_slice(f"{text}layers.0.mlp.experts.7.{k}.weight").get_shape())
                assert shape("gate_proj") == shape("up_proj") == [32, 64]
                assert shape("down_proj") == [64, 32]


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_loads_and_not_degenerate(tiny_dirs, prompts, variant):
    family, layout, _ = variant
    logits = _logits(tiny_dirs[variant], family, layout, prompts)
    assert logits.shape == (4, 24, 1000)
    assert torch.isfinite(logits).all()
    probs = logits.softmax(-1)
    top2 = logits.topk(2, dim=-1).values
    mean_max = probs.max(-1).values.mean().item()
    median_margin = (top2[..., 0] - top2[..., 1]).median().item()
    assert mean_max >= MIN_MEAN_MAX_PROB, mean_max
    assert median_margin >= MIN_MEDIAN_MARGIN, median_margin
    # not the same distribution everywhere
    assert logits.argmax(-1).unique().numel() > 10


def test_hidden_states_sane(tiny_dirs, prompts):
    model = _load(tiny_dirs["moe", "causal", "stacked"], "moe", "causal")
    with torch.no_grad():
        out = model(input_ids=prompts, output_hidden_states=True)
    rms = [h.float().pow(2).mean().sqrt().item() for h in out.hidden_states]
    assert all(0.1 < r < 10 for r in rms), rms


def test_norms_and_gdn_params_randomised(tiny_dirs):
    path = tiny_dirs["dense", "causal", "stacked"]
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight",
                     "model.layers.3.self_attn.q_norm.weight"):
            w = h.get_tensor(name)
            assert w.abs().max() > 0.01 and w.std() > 0.01, name  # zero-centred (1 + w) norms, not all zero
        gn = h.get_tensor("model.layers.0.linear_attn.norm.weight")
        assert (gn - 1).abs().max() > 0.01
        assert h.get_tensor("model.layers.0.linear_attn.dt_bias").std() > 0.05
        assert h.get_tensor("model.layers.0.linear_attn.A_log").std() > 0.05


@pytest.mark.parametrize("layout", ["conditional", "causal"])
def test_stacked_and_per_expert_identical(tiny_dirs, prompts, layout):
    a = _logits(tiny_dirs["moe", layout, "stacked"], "moe", layout, prompts)
    b = _logits(tiny_dirs["moe", layout, "per_expert"], "moe", layout, prompts)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_conditional_and_causal_share_text_weights(tiny_dirs, prompts):
    a = _logits(tiny_dirs["dense", "conditional", "stacked"], "dense", "conditional", prompts)
    b = _logits(tiny_dirs["dense", "causal", "stacked"], "dense", "causal", prompts)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_classes_tokenizer_and_generate(tiny_dirs):
    path = tiny_dirs["dense", "causal", "stacked"]
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == 1000 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = tok("The robot counts the clouds", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert gen.shape[1] == ids.shape[1] + 20
    assert isinstance(tok.decode(gen[0]), str)


def test_generate_conditional_moe(tiny_dirs):
    path = tiny_dirs["moe", "conditional", "per_expert"]
    model = _load(path, "moe", "conditional")
    ids = torch.tensor([[10, 20, 30, 40]])
    gen = model.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert gen.shape == (1, 24)


@pytest.mark.parametrize("tie", [False, True])
def test_tie_embeddings_shards_dtype(tmp_path, tie):
    path = make_tiny(tmp_path / "t", family="dense", layout="conditional", shards=3, tie_embeddings=tie,
                     dtype="bfloat16", seed=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in path.glob("*.safetensors")) == files
    assert not (path.parent / "t.partial").exists()
    keys = _keys(path)
    assert sorted(keys) == sorted(index["weight_map"])
    assert ("lm_head.weight" in keys) is (not tie)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie
    with safe_open(str(path / files[0]), "pt") as h:
        assert h.get_tensor(next(iter(h.keys()))).dtype == torch.bfloat16
    model = _load(path, "dense", "conditional")
    emb = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight.data_ptr() == emb.data_ptr()) is tie
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]])).logits.float()
    assert torch.isfinite(logits).all()
    assert logits.softmax(-1).max(-1).values.mean() >= MIN_MEAN_MAX_PROB


def test_vocab_size_and_layers(tmp_path):
    path = make_tiny(tmp_path / "v", family="moe", layout="causal", vocab_size=1024, num_layers=8,
                     dtype="float16")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == 1024 and cfg["num_hidden_layers"] == 8
    assert cfg["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 2
    model = _load(path, "moe", "causal")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape[-1] == 1024 and torch.isfinite(logits).all()


def test_bad_arguments(tmp_path):
    with pytest.raises(DualbrainError):
        make_tiny(tmp_path / "x", family="sparse")
    with pytest.raises(DualbrainError):
        make_tiny(tmp_path / "x", dtype="int8")
    with pytest.raises(DualbrainError):
        make_tiny(tmp_path / "x", vocab_size=10)
    with pytest.raises(DualbrainError):
        make_tiny(tmp_path / "x", shards=0)
    assert not (tmp_path / "x").exists()
