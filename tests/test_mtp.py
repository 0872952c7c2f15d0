"""The MTP head block against a plain reference of its formula.

transformers drops `mtp.*` on load, so the reference is written here: the published formula
`fc(cat(norm_e(embed(x_{t+1})), norm_h(h_t)))` -> one full-attention decoder layer -> `mtp.norm` ->
the model's `lm_head`, with the decoder layer, its rotary embedding and its norms taken from
transformers' own modeling code (loaded with the raw `mtp.layers.0.*` tensors, read from the
safetensors files directly, not through dualbrain's checkpoint reader). The exported block runs in
chunks with its own K/V cache (prefill, one decode step, a 3-token step) on batch 2; the reference
runs each whole sequence at once.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

CASES = {
    "moe-stacked": dict(family="moe", experts="stacked"),
    "moe-per_expert": dict(family="moe", experts="per_expert", shards=3),
    "dense": dict(family="dense", shards=2),
}


def _raw_tensors(ckpt):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _zc(x, w, eps):
    """Zero-centred RMSNorm, written out: x / rms(x) * (1 + w), in fp32."""
    import torch

    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())


def _reference(ckpt, hidden, next_ids, positions, normalize):
    """Logits and mtp-normed hidden states (B, T, ...) of the MTP head over whole sequences."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    text = getattr(cfg, "text_config", cfg)
    text._attn_implementation = "eager"
    moe = text.model_type == "qwen3_5_moe_text"
    if moe:
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as mod
        layer_cls, rope_cls = mod.Qwen3_5MoeDecoderLayer, mod.Qwen3_5MoeTextRotaryEmbedding
    else:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as mod
        layer_cls, rope_cls = mod.Qwen3_5DecoderLayer, mod.Qwen3_5TextRotaryEmbedding
    w = _raw_tensors(ckpt)
    lm = next(k for k in w if k.endswith("embed_tokens.weight")).rsplit("embed_tokens.weight", 1)[0]
    eps = text.rms_norm_eps
    layer = layer_cls(text, text.layer_types.index("full_attention")).eval()
    sd = {k[len("mtp.layers.0."):]: v for k, v in w.items() if k.startswith("mtp.layers.0.")}
    if moe and "mlp.experts.gate_up_proj" not in sd:      # per-expert files: stack them as transformers holds them
        e = text.num_experts
        sd["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd.pop(f"mlp.experts.{j}.gate_proj.weight"), sd.pop(f"mlp.experts.{j}.up_proj.weight")])
             for j in range(e)])
        sd["mlp.experts.down_proj"] = torch.stack([sd.pop(f"mlp.experts.{j}.down_proj.weight") for j in range(e)])
    layer.load_state_dict(sd, strict=True)
    rope = rope_cls(text)
    with torch.no_grad():
        h = torch.from_numpy(hidden)
        if normalize:
            h = _zc(h, w[lm + "norm.weight"], eps)
        emb = torch.nn.functional.embedding(torch.from_numpy(next_ids), w[lm + "embed_tokens.weight"])
        x = torch.cat([_zc(emb, w["mtp.pre_fc_norm_embedding.weight"], eps),
                       _zc(h, w["mtp.pre_fc_norm_hidden.weight"], eps)], -1) @ w["mtp.fc.weight"].T
        t = x.shape[1]
        mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        pos = torch.from_numpy(positions)
        x = layer(x, position_embeddings=rope(x, pos), attention_mask=mask, position_ids=pos)
        y = _zc(x, w["mtp.norm.weight"], eps)
        head = w.get("lm_head.weight", w[lm + "embed_tokens.weight"])
        return (y @ head.T).numpy(), y.numpy()


@pytest.mark.parametrize("normalize", [1, 0], ids=["final-normed", "pre-norm"])
@pytest.mark.parametrize("case", list(CASES))
def test_mtp_block_matches_reference(artifacts, case, normalize):
    from dualbrain.runtime.model import Model

    ckpt = artifacts.checkpoint(**CASES[case])
    model = Model.load(artifacts.export(ckpt))
    block = model.manifest.side("mtp")
    assert block is not None and block.file in model.manifest.files
    spec = model.spec
    rng = np.random.default_rng(3)
    b, t = 2, 9
    hidden = (rng.standard_normal((b, t, spec.hidden_size)) * 2).astype(np.float32)
    next_ids = rng.integers(0, spec.vocab_size, (b, t)).astype(np.int64)
    positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int64).copy()
    ref_logits, ref_hidden = _reference(ckpt, hidden, next_ids, positions, normalize)
    assert ref_logits.std() > 1.0, "the tiny MTP head's logits should be peaked, not near-uniform"

    kv = (0, b, spec.num_kv_heads, spec.head_dim)
    past_k, past_v = np.zeros(kv, np.float32), np.zeros(kv, np.float32)
    logits, hid = [], []
    for lo, hi in ((0, 5), (5, 6), (6, 9)):
        embedded = model.embed_ids(next_ids[:, lo:hi])
        out = model.backend.run(block, {
            "hidden": hidden[:, lo:hi], "embedded": embedded, "normalize_hidden": np.array([normalize], np.int64),
            "attention_mask": np.ones((b, hi), np.int64), "position_ids": positions[:, lo:hi],
            "past_key": past_k, "past_value": past_v})
        past_k = np.concatenate([past_k, out["new_key"]])
        past_v = np.concatenate([past_v, out["new_value"]])
        logits.append(out["logits"])
        hid.append(out["hidden_out"])
    for name, got, ref in (("logits", np.concatenate(logits, 1), ref_logits),
                           ("hidden_out", np.concatenate(hid, 1), ref_hidden)):
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-5, f"{name}: max|d|/max|ref| = {rel:.2e}"


def test_mtp_shares_lm_head_and_is_absent_without_weights(artifacts):
    from dualbrain.runtime.manifest import load_manifest

    ckpt = artifacts.checkpoint("moe")
    out = artifacts.export(ckpt)
    import onnx

    g = onnx.load(str(out / "mtp.onnx"), load_external_data=False)
    lm = next(t for t in g.graph.initializer if t.name == "lm_head")
    assert {e.key: e.value for e in lm.external_data}["location"] == "head.onnx.data"
    # the causal layout ships no MTP head: the export has no side block and runs as before
    causal = load_manifest(artifacts.export(artifacts.checkpoint("moe", layout="causal")))
    assert causal.side("mtp") is None
    assert json.loads((out / "manifest.json").read_text())["blocks"][-1]["kind"] == "mtp"
