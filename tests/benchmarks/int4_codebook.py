"""Fake-quant study of how the experts' 4-bit rounding moves top-1 agreement with fp32, scored as issue 16
scores it: the exporter's uniform grid (with and without negative scales) against a non-uniform
codebook (llama.cpp's IQ4_NL values). An experiment, not a product path.

Why: one trained model's agreement moves by whole percents between roundings of equal error (its
unsure positions flip either way), so a rounding is judged here on three trained models at once, and
on the squared error and KL divergence beside the agreement. What it found (RESULTS, "Fifteenth pass"):
searching negative scales too (the block's largest |w| on the grid's longer end, -8) lowers the
experts' squared error by 11 % and lifts int4-experts' agreement on all three models, which the
exporter now does; the codebook lowers it by 28 % at the same bytes (4 bits a weight, one float16 scale
a block of 32) and lifts int4-experts further on two of the three, but needs a new on-disk form and a
lookup in the kernels, so it is not built.

Each weight the export would quantize is rounded here as the export would round it (same roles, block
sizes and bits; embeddings and the router at 8 bits), then put back into the transformers model in
float32, so only the rounding differs between rows. Two protocols:

  pair   the committed pair's large model, the test's prompts and 256 teacher-forced positions
         (tests/test_quant_experts.py::test_trained_pair_agreement), and 12 more random prompts
         ("wide": 1024 positions) because 256 positions move by whole percents between roundings
  text   a model trained by tests/benchmarks/llama_agreement.py (WORK/large) on its training text, at
         llama-perplexity's positions (4032 with --chunks 64)

    python tests/benchmarks/int4_codebook.py pair [--configs NAME,..]
    python tests/benchmarks/int4_codebook.py text WORK [--chunks 64] [--configs NAME,..]

Configs: NAME = <dense>-<experts>[-head4|-headcb][-emb4|-embcb], dense in {int4, int8, codebook} (the dense
linears: uniform at 4 or 8 bits as the exporter rounds them, or 4-bit on the codebook), experts in
{uniform, positive, codebook}: "uniform" is the exporter's rounding of the experts (negative scales
searched too), "positive" the one before the fifteenth pass. So int4-uniform is `--quant int4`,
int8-uniform `--quant int4-experts`, and int4-positive / int8-positive the same modes before;
head4 / headcb put the LM head at 4 bits (uniform / codebook), emb4 / embcb the embeddings (8 bits
otherwise).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dualbrain.exporter.quantize import dequantize_blockwise, quantize_blockwise

BLOCK = 32
# llama.cpp's kvalues_iq4nl (ggml-common.h): the IQ4_NL codebook, in units of the block's scale
CODEBOOK = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
# scales tried per block: the largest |w| onto either end of the codebook, times these
CODEBOOK_FRACTIONS = np.linspace(0.85, 1.15, 13)


def uniform(w: np.ndarray, axis: int, bits: int, negative_scales: bool = False) -> np.ndarray:
    """The exporter's rounding (symmetric, float16 scales, its scale search), dequantized."""
    q, s = quantize_blockwise(w, axis, BLOCK, bits, np.float16, negative_scales)
    return dequantize_blockwise(q, s.astype(np.float32), axis, BLOCK)


def experts_uniform(w: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """The exporter's rounding of the experts: negative scales searched too (since the fifteenth pass)."""
    return uniform(w, axis, bits, negative_scales=True)


def codebook(w: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """Each block of 32 along `axis` as float16 scale x CODEBOOK[index]: the scale (either sign, so the
    largest |w| can take the longer end) with the least squared error, each weight its nearest value."""
    assert bits == 4
    wm = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    wb = wm.reshape(*wm.shape[:-1], wm.shape[-1] // BLOCK, BLOCK)
    peak = np.take_along_axis(wb, np.abs(wb).argmax(-1)[..., None], -1)      # the signed largest |w|
    best = best_err = None
    for end in (CODEBOOK[0], CODEBOOK[-1]):
        for f in CODEBOOK_FRACTIONS:
            d = (peak / end * f).astype(np.float16).astype(np.float32)
            d = np.where(d == 0, np.float32(1e-8), d)
            deq = CODEBOOK[np.abs(wb[..., None] / d[..., None] - CODEBOOK).argmin(-1)] * d
            err = np.square(deq - wb).sum(-1)
            if best is None:
                best, best_err = deq, err
            else:
                better = err < best_err
                best, best_err = np.where(better[..., None], deq, best), np.minimum(err, best_err)
    return np.moveaxis(best.reshape(wm.shape), -1, axis)


EXPERTS = {"uniform": experts_uniform, "positive": uniform, "codebook": codebook}


def role(name: str, w) -> str | None:
    """The exporter's role for a checkpoint tensor (exporter.quantize's LINEAR / EXPERTS / EMBEDDING /
    ROUTER), or None where it stays float (norms, conv, gates' A / dt, the MTP head, the vision tower)."""
    if name.startswith("mtp") or "visual" in name or w.ndim == 1 or "conv1d" in name:
        return None
    if "experts" in name:
        return "experts"
    if "embed_tokens" in name:
        return "embedding"
    if name.endswith("mlp.gate.weight"):
        return "router"
    return "linear" if name.endswith(".weight") and w.ndim == 2 else None


def rounded(state: dict, config: str) -> dict:
    """The quantized tensors of `state` (name -> float32 numpy) under `config`, dequantized."""
    dense, experts, *extra = config.split("-")
    # role -> (rounding, bits); the LM head and the embeddings follow the dense linears / 8 bits unless told
    rule = {"experts": (EXPERTS[experts], 4), "router": (uniform, 8), "embedding": (uniform, 8),
            "linear": (codebook, 4) if dense == "codebook" else (uniform, int(dense[3:]))}
    rule["head"] = rule["linear"]
    for e in extra:          # head4 / headcb / emb4 / embcb: 4 bits, uniform or on the codebook
        which = "head" if e.startswith("head") else "embedding"
        rule[which] = (codebook, 4) if e.endswith("cb") else (uniform, 4)
    out = {}
    for name, w in state.items():
        r = role(name, w)
        if r is None:
            continue
        axis = w.ndim - 1          # experts and embeddings: the last axis; linears [out, in]: K is last too
        if w.shape[axis] % BLOCK or (r == "linear" and w.shape[0] == 1 and w.shape[1] == BLOCK):
            continue               # the exporter leaves these in float (no block divides K, or one block in all)
        fn, bits = rule["head" if name == "lm_head.weight" else r]
        out[name] = fn(w, axis, bits)
    return out


class Scorer:
    """fp32's predictions on fixed sequences, and a rounding's agreement with them."""

    def __init__(self, checkpoint: Path, sequences: list[list[int]], first: list[int], test_rows: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.sequences, self.first, self.test_rows = sequences, first, test_rows
        self.reference = self._log_probs()

    def _log_probs(self) -> list:
        with self.torch.no_grad():
            return [self.torch.log_softmax(self.model(self.torch.tensor([s])).logits[0].double(), -1)[f - 1:-1]
                    for s, f in zip(self.sequences, self.first)]

    def score(self, config: str) -> dict:
        numpy_state = {k: v.numpy() for k, v in self.state.items()}
        new = rounded(numpy_state, config)
        self.model.load_state_dict({k: self.torch.from_numpy(np.ascontiguousarray(v)) for k, v in new.items()},
                                   strict=False)
        try:
            quantized = self._log_probs()
        finally:
            self.model.load_state_dict(self.state)
        same = [(q.argmax(-1) == r.argmax(-1)).numpy() for q, r in zip(quantized, self.reference)]
        sure = [(r.exp().max(-1).values >= 0.5).numpy() for r in self.reference]
        kl = [(r.exp() * (r - q)).sum(-1).numpy() for q, r in zip(quantized, self.reference)]
        experts = [k for k in new if "experts" in k]
        test, test_sure = np.concatenate(same[:self.test_rows]), np.concatenate(sure[:self.test_rows])
        out = {"agreement": float(test.mean()), "agreement_unsure": float(test[~test_sure].mean()),
               "positions": int(test.size),
               "kl_mean": float(np.concatenate(kl).mean()), "kl_median": float(np.median(np.concatenate(kl))),
               "experts_relative_mse": float(np.mean([np.square(new[k] - numpy_state[k]).sum()
                                                      / np.square(numpy_state[k]).sum() for k in experts]))}
        if len(same) > self.test_rows:
            out["agreement_wide"] = float(np.concatenate(same).mean())
            out["positions_wide"] = int(np.concatenate(same).size)
        return out


def pair_scorer() -> Scorer:
    import torch
    from transformers import AutoModelForCausalLM

    from dualbrain.recipes.pair import TRAINED as pair

    prompts = [list(range(40, 56)), list(range(300, 316)), list(range(600, 616)), list(range(900, 916))]
    rng = np.random.default_rng(1)
    prompts += [[int(i) for i in rng.integers(10, 980, 16)] for _ in range(12)]
    model = AutoModelForCausalLM.from_pretrained(pair.large_checkpoint, dtype=torch.float32).eval()
    sequences = []
    with torch.no_grad():
        for p in prompts:      # fp32's greedy continuation, 64 tokens (runtime.agreement's positions)
            ids = list(p)
            for _ in range(64):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            sequences.append(ids)
    return Scorer(pair.large_checkpoint, sequences, [len(p) for p in prompts], test_rows=4)


def text_scorer(work: Path, chunks: int, ctx: int) -> Scorer:
    sys.path.insert(0, str(Path(__file__).parent))
    from llama_agreement import training_text

    ids = training_text(chunks, ctx)
    sequences = [ids[c * ctx:(c + 1) * ctx] for c in range(chunks)]
    return Scorer(work / "large", sequences, [ctx // 2 + 1] * chunks, test_rows=chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("protocol", choices=("pair", "text"))
    ap.add_argument("work", type=Path, nargs="?", help="text: llama_agreement.py's WORK (its model in WORK/large)")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--configs", default=",".join((
        "int4-positive", "int4-uniform", "int4-codebook", "codebook-codebook", "int8-positive", "int8-uniform",
        "int8-codebook", "int8-uniform-head4", "int8-codebook-head4", "int8-codebook-headcb")))
    a = ap.parse_args()
    scorer = pair_scorer() if a.protocol == "pair" else text_scorer(a.work, a.chunks, a.ctx)
    result = {}
    for config in a.configs.split(","):
        result[config] = scorer.score(config)
        print(config, {k: round(v, 4) for k, v in result[config].items()}, file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
