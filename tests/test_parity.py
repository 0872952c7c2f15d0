"""End-to-end parity with transformers (the reference) on tiny checkpoints, fp32.

For each (family, layout, expert format): greedy generation is token-identical to transformers'
`generate` for 64 new tokens at prompt lengths 1, 7 and 100; a batch of 3 prompts of different
lengths gives each prompt's solo tokens; `diff` finds every block within rel <= 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FP32_CASES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dualbrain.exporter.diff import diff  # noqa: E402
from dualbrain.runtime.generate import decode_one, generate, prefill  # noqa: E402
from dualbrain.runtime.model import Model  # noqa: E402
from dualbrain.runtime.sampling import SamplingParams  # noqa: E402

NEW_TOKENS = 64


@pytest.fixture(scope="module", params=list(FP32_CASES), ids=list(FP32_CASES))
def case(request, artifacts):
    ckpt = artifacts.checkpoint(**FP32_CASES[request.param])
    out = artifacts.export(ckpt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    return ckpt, out, Model.load(out), ref


def _per_block(out):
    return Model.load(out, linked=False)


def _reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy(model: Model, prompt: list[int], n: int) -> list[int]:
    state, logits = prefill(model, [prompt])
    ids = []
    for _ in range(n):
        tok = logits.argmax(-1)
        ids.append(int(tok[0]))
        logits = decode_one(model, state, tok)
    return ids


@pytest.mark.parametrize("linked", [True, False], ids=["linked", "per-block"])
@pytest.mark.parametrize("prompt_len", [1, 7, 100])
def test_greedy_matches_transformers(case, prompt_len, linked):
    _, out, model, ref = case
    if not linked:
        model = _per_block(out)
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(0, model.vocab_size, prompt_len).tolist()
    expected = _reference_greedy(ref, prompt, NEW_TOKENS)
    got = _greedy(model, prompt, NEW_TOKENS)
    assert got == expected
    assert len(set(got)) > 1 or prompt_len == 1, "degenerate generation proves little"


@pytest.mark.parametrize("linked", [True, False], ids=["linked", "per-block"])
def test_greedy_through_rollback_matches_transformers(case, linked):
    """Every step feeds the chosen token plus two junk drafts after a mark, then rolls the junk back
    (window variants + rollback, as speculative decoding does): still transformers' greedy tokens."""
    _, out, model, ref = case
    if not linked:
        model = _per_block(out)
    rng = np.random.default_rng(99)
    prompt = rng.integers(0, model.vocab_size, 7).tolist()
    expected = _reference_greedy(ref, prompt, NEW_TOKENS)
    state, logits = prefill(model, [prompt])
    got = []
    for _ in range(NEW_TOKENS):
        tok = int(logits.argmax(-1)[0])
        got.append(tok)
        state.mark()
        step = model.forward(np.array([[tok, *rng.integers(0, model.vocab_size, 2)]]), state, logits_to_keep=3)
        state.rollback(0, 1)
        logits = step[:, 0]
    assert got == expected


def test_batch_equals_solo(case):
    _, _, model, _ = case
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, model.vocab_size, n).tolist() for n in (5, 23, 12)]
    params = SamplingParams(greedy=True, max_new_tokens=24)
    batched = generate(model, prompts, params)
    for p, g in zip(prompts, batched):
        solo = generate(model, [p], params)[0]
        assert g.new_ids == solo.new_ids
        assert g.finish_reason == solo.finish_reason


def test_every_block_within_tolerance(case):
    ckpt, out, _, _ = case
    rows = diff(ckpt, out)
    assert rows and len({r.block for r in rows}) == len(Model.load(out).manifest.chain)
    worst = max(rows, key=lambda r: r.rel)
    assert all(r.ok for r in rows), f"over tolerance: {worst}"
    assert worst.rel <= 1e-5
    # both steps and every state output were compared
    assert {r.step for r in rows} == {"prefill", "decode"}
    assert any(r.output == "recurrent_state_out" for r in rows) and any(r.output == "new_key" for r in rows)


def test_cpu_attention_is_the_exported_node(case):
    """Full-attention blocks carry one ONNX `Attention` node (what TensorRT fuses); the ONNX Runtime
    backend runs it split (runtime.backends.onnxruntime.split_attention), which the tests above diff
    against transformers. Both forms give the same outputs: prefill over padding, chunks over a past,
    decode."""
    import onnx
    import onnxruntime as ort

    from dualbrain.runtime.backends.onnxruntime import OrtBackend
    from dualbrain.runtime.blocks import random_feeds

    _, out, model, _ = case
    man = model.manifest
    backend = OrtBackend(out, man, linked=False)
    for block in man.blocks:
        if block.kind not in ("full_attention", "mtp"):
            continue
        graph = onnx.load(str(out / block.file), load_external_data=False)
        assert [n.op_type for n in graph.graph.node].count("Attention") == 1, block.name
        exported = ort.InferenceSession(str(out / block.file), providers=["CPUExecutionProvider"])
        for batch, seq, past in ((3, 6, 0), (2, 4, 9), (2, 1, 17)):
            feeds = random_feeds(block.inputs, man.model.vocab_size, batch=batch, seq=seq, past=past, seed=past)
            feeds["attention_mask"][0, :2] = 0                 # a left-padded row
            names = [t.name for t in block.outputs]
            want = dict(zip(names, exported.run(names, feeds)))
            got = backend.run(block, feeds)
            for name in names:      # float32 summation order differs: 1e-6 of the output's scale
                scale = max(1.0, float(np.abs(want[name]).max()))
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6 * scale,
                                           err_msg=f"{block.name} {name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("head_dim,factor", [(256, 0.25), (24, 2 / 3), (64, 1.0)])
def test_rotary_is_transformers_bit_for_bit(dtype, head_dim, factor):
    """The exporter's rotary (cos/sin over the whole head, rotate-half as one Gather) gives transformers'
    Qwen3.5 rotary embedding and `apply_rotary_pos_emb` exactly, on text positions (mrope sections all
    at the same position), partial and full."""
    import torch
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    from dualbrain.exporter.blocks.norms import apply_rotary, rotary_cos_sin, rotate_half_index

    rotary_dim = int(head_dim * factor)
    config = Qwen3_5TextConfig(head_dim=head_dim, rope_parameters={
        "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": factor,
        "mrope_section": [rotary_dim // 8, rotary_dim // 8, rotary_dim // 2 - 2 * (rotary_dim // 8)],
        "mrope_interleaved": True})
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 3, 7, head_dim, generator=gen).to(torch_dtype)
    k = torch.randn(2, 1, 7, head_dim, generator=gen).to(torch_dtype)
    positions = torch.randint(0, 200_000, (2, 7), generator=gen)
    rope = hf.Qwen3_5TextRotaryEmbedding(config)
    cos, sin = rope(q, positions[None].expand(3, -1, -1))
    want = hf.apply_rotary_pos_emb(q, k, cos.to(torch_dtype), sin.to(torch_dtype))

    ours_cos, ours_sin = rotary_cos_sin(positions, rope.inv_freq, torch_dtype, head_dim)
    index = rotate_half_index(rotary_dim, head_dim)
    assert torch.equal(apply_rotary(q, ours_cos, ours_sin, index), want[0])
    assert torch.equal(apply_rotary(k, ours_cos, ours_sin, index), want[1])
