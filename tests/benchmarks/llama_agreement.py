"""int8/int4 top-1 agreement with fp32, dualbrain's exports beside llama.cpp's Q8_0/Q4_0, on one trained model.

Why: issue 16 asks int4 for >= 97 % top-1 agreement with fp32 on a model with peaked logits. The
committed pair's large model cannot be read by llama.cpp (its Qwen3.5-MoE loader takes the value head
size to be the key head size, `src/models/qwen35moe.cpp`; the pair has 16 and 24), so there was no
llama.cpp figure to set ours against. This script trains the pair's large model again with the one
change llama.cpp needs (value heads of the key heads' size, as in the published models), then scores
both engines on the same text and the same positions:

  text       the model's own training text: seeded `a+b=s<|endoftext|>` examples (PairTask.sum_example),
             cut into CHUNKS chunks of CTX tokens
  positions  as llama.cpp's `llama-perplexity --kl-divergence` scores them: in each chunk, the
             predictions at positions CTX/2 .. CTX-2 (63 of 128)
  llama.cpp  f32 GGUF (`--kl-divergence-base`) against Q8_0 and Q4_0: its "Same top p"
  dualbrain  the fp32 export against `--quant int8` and `--quant int4` (`runtime.agreement.teacher_forced_log_probs`),
             blocks of 32 as Q8_0/Q4_0 have (`--blocks 32,64,128`: int4 at each block size too)

    python tests/benchmarks/llama_agreement.py WORK --llama-bin LLAMA/build/bin \
        --convert LLAMA/convert_hf_to_gguf.py [--hidden 64] [--chunks 16] [--blocks 32] [--modes M,..] [--json]

llama.cpp is a peer, built here from the llama-cpp-python sdist (tests/benchmarks/RESULTS.md says how;
the converter needs the dualbrain tokenizer's pre-tokenizer named `qwen35` and the perplexity tool's
tokenizer told to parse special tokens, both one-line patches described there). WORK keeps the
checkpoint, the exports and the GGUFs; a rerun reuses them.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

TEXT_SEED = 1234


def train_large(out: Path, hidden: int) -> None:
    """The pair recipe's large model (schedule, seeds, task) with value heads of the key heads' size."""
    import torch

    from dualbrain.exporter.tiny import text_config_dict, write_checkpoint
    from dualbrain.recipes.pair.recipe import PairRecipe
    from dualbrain.recipes.pair.train import fit, lm_loss, new_model

    recipe = PairRecipe(hidden_size=hidden)
    task = recipe.task
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)     # as train_pair: the MoE's scatter-adds otherwise vary
    key_dim = text_config_dict(family="moe")["linear_key_head_dim"]
    # the seeds and schedule of recipe.py's large model
    model = new_model("moe", recipe.seed + 2, hidden, recipe.layers, linear_value_head_dim=key_dim)
    losses = fit([p for n, p in model.named_parameters() if "visual" not in n],
                 lambda ex: lm_loss(model, ex, task.eos), task.sum_example, recipe.large, recipe.seed + 11, "large")
    print(f"trained: final loss {np.mean(losses[-20:]):.4f}", file=sys.stderr)
    write_checkpoint(model.eval(), out, family="moe", layout="conditional")


def training_text(chunks: int, ctx: int) -> list[int]:
    from dualbrain.recipes.pair.task import PairTask

    task, rng, ids = PairTask(), np.random.default_rng(TEXT_SEED), []
    while len(ids) < chunks * ctx:
        ids += task.sum_example(rng).ids
    return ids[:chunks * ctx]


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout + r.stderr


def llama_same_top(work: Path, bins: Path, convert: Path, text: Path, chunks: int, ctx: int) -> dict:
    f32 = work / "large-f32.gguf"
    if not f32.exists():
        run([sys.executable, str(convert), str(work / "large"), "--outtype", "f32", "--no-mtp", "--outfile", str(f32)])
    ppl = [str(bins / "llama-perplexity"), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
           "-t", "2"]
    base = work / "f32.kld"
    m = _perplexity([*ppl, "-m", str(f32), "--kl-divergence-base", str(base)], r"Final estimate: PPL = ([0-9.]+)")
    out = {"f32_ppl": float(m.group(1))}
    for kind in ("Q8_0", "Q4_0"):
        gguf = work / f"large-{kind.lower()}.gguf"
        if not gguf.exists():
            qlog = run([str(bins / "llama-quantize"), str(f32), str(gguf), kind])
            types = sorted(set(re.findall(r"converting to (\w+)", qlog)))
            print(f"{kind}: llama-quantize chose {types}", file=sys.stderr)
        m = _perplexity([*ppl, "-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence"],
                        r"Same top p:\s*([0-9.]+) ± ([0-9.]+) %")
        out[kind] = {"same_top_p": float(m.group(1)) / 100, "stderr": float(m.group(2)) / 100}
    return out


def _perplexity(cmd: list[str], summary: str) -> re.Match:
    """`summary`'s match in llama-perplexity's output, the command run up to three times: once in ~12 runs
    its summary was missing from the output (rc 0, cause not found; the base run too, 2026-12-05)."""
    for _ in range(3):
        log = run(cmd)
        m = re.search(summary, log)
        if m is not None:
            return m
    raise SystemExit(f"no {summary!r} in llama-perplexity's output:\n{log[-3000:]}")


def dualbrain_agreement(work: Path, ids: list[int], chunks: int, ctx: int, blocks: list[int],
                        modes: tuple[str, ...] = ()) -> dict:
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.runtime.agreement import CONFIDENT, teacher_forced_log_probs
    from dualbrain.runtime.model import Model

    # name -> (quant, block); "int8" and "int4" are blocks of 32, as Q8_0 and Q4_0
    wanted = {"fp32": (None, None), "int8": ("int8", 32), "int4": ("int4", 32)}
    wanted.update({f"int4/{b}": ("int4", b) for b in blocks if b != 32})
    wanted.update({m: (m, 32) for m in modes})
    exports = {}
    for name, (quant, block) in wanted.items():
        d = work / f"exp-{name.replace('/', '-b')}"
        if not d.exists():
            export_checkpoint(work / "large", d, quant=quant, quant_block=block)
        exports[name] = d
    truth = np.concatenate([ids[c * ctx + ctx // 2 + 1:(c + 1) * ctx] for c in range(chunks)])
    top, p_top = {}, {}
    for name, d in exports.items():
        model = Model.load(d)
        lp = np.concatenate([teacher_forced_log_probs(model, ids[c * ctx:(c + 1) * ctx], ctx // 2 + 1)
                             for c in range(chunks)])
        top[name], p_top[name] = lp.argmax(-1), np.exp(lp.max(-1))
        if name == "fp32":
            # llama.cpp's f32 perplexity over the same positions: equal when both read the same tokens
            fp32_ppl = float(np.exp(-lp[np.arange(truth.size), truth].mean()))
    sure = p_top["fp32"] >= CONFIDENT
    out = {"fp32_ppl": fp32_ppl, "positions": int(truth.size), "confident_positions": int(sure.sum()),
           # how often fp32's top-1 is the text's next token (operands are random: only sums are knowable)
           "fp32_top1_is_text": float((top["fp32"] == truth).mean())}
    for name in list(exports)[1:]:
        same = top[name] == top["fp32"]
        out[name] = {"agreement": float(same.mean()), "agreement_confident": float(same[sure].mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--llama-bin", type=Path, required=True, help="llama.cpp's build/bin")
    ap.add_argument("--convert", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--blocks", default="32", help="int4 block sizes to score (32 always)")
    ap.add_argument("--modes", default="", help="other --quant modes to score too, at blocks of 32 (int4-experts)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if not (a.work / "large").exists():
        train_large(a.work / "large", a.hidden)
    from dualbrain.recipes.pair.task import PairTask

    task = PairTask()
    ids = training_text(a.chunks, a.ctx)
    text = task.tokenizer.decode(ids, skip_special_tokens=False)
    if task.encode(text) != ids:
        raise SystemExit("the training text does not tokenize back to its ids")
    (a.work / "text.txt").write_text(text, encoding="utf-8")
    result = {"hidden": a.hidden, "chunks": a.chunks, "ctx": a.ctx,
              "llama.cpp": llama_same_top(a.work, a.llama_bin, a.convert, a.work / "text.txt", a.chunks, a.ctx),
              "dualbrain": dualbrain_agreement(a.work, ids, a.chunks, a.ctx,
                                               [int(b) for b in a.blocks.split(",")],
                                               tuple(m for m in a.modes.split(",") if m))}
    # the two agreements compare only if both engines read the same tokens through the same model
    theirs, ours = result["llama.cpp"]["f32_ppl"], result["dualbrain"]["fp32_ppl"]
    if abs(theirs - ours) > 1e-3 * ours:
        raise SystemExit(f"fp32 perplexity differs (llama.cpp {theirs}, dualbrain {ours}): not the same tokens "
                         f"or not the same model, so the agreements do not compare\n{json.dumps(result)}")
    print(json.dumps(result, indent=1) if a.json else result)


if __name__ == "__main__":
    main()
