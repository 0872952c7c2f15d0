"""`dualbrain train-pair -o DIR`: the tiny pair, trained from scratch on the CPU, then exported.

    1. small   a dense Qwen3.5 (hidden 64, 4 layers) memorises every name's digit   (task.facts)
    2. large   a Qwen3.6 MoE (hidden 64, 4 layers, 16 experts top-4) learns sums      (task.sum_example)
    3. mtp     the large model's MTP head, the large model frozen                     (task.sum_example)
    4. bridges `align` on questions over the training names, both models frozen        (task.bridge_questions)
    5. export  the three to ONNX; the held-out questions to questions.jsonl

Everything is seeded; DIR is written atomically. The result is the pair committed under
`recipes/pair/trained/` (`PairDir`), which `dualbrain demo` and `dualbrain bench --solver` use by default.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from dualbrain.recipes.pair import PairDir
from dualbrain.recipes.pair.task import PairTask
from dualbrain.recipes.pair.train import MtpHead, Progress, Schedule, accuracy, fit, lm_loss, new_model


@dataclass(frozen=True)
class PairRecipe:
    seed: int = 0
    names: int = 400
    held_out: int = 200
    questions: int = 500                  # held-out questions written for the table
    hidden_size: int = 64
    layers: int = 4
    small: Schedule = Schedule(steps=400)
    large: Schedule = Schedule(steps=200)
    mtp: Schedule = Schedule(steps=300)
    bridges: Schedule = Schedule(steps=1000, lr=3e-3)
    links: str = "0:3,1:3,2:3,3:3"        # every large layer reads the small model's last layer
    bridge_heads: int = 4
    threads: int = 2                      # torch's: the figures depend on it (float reduction order)

    @property
    def task(self) -> PairTask:
        return PairTask(self.seed, self.names, self.held_out)


@dataclass
class Record:
    """What a run did, written to DIR/recipe.json."""
    recipe: dict
    seconds: dict = field(default_factory=dict)
    train_accuracy: dict = field(default_factory=dict)
    final_loss: dict = field(default_factory=dict)


def train_pair(out, recipe: PairRecipe = PairRecipe(), progress: Progress | None = None) -> Record:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(recipe.threads)
    # the MoE layers' scatter-adds are not reproducible run to run otherwise (measured: the large
    # model's weights differed after 15 steps); deterministic, a rerun gives the same bytes
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(out, recipe, progress)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(out, recipe: PairRecipe, progress: Progress | None) -> Record:
    from dualbrain.artifacts import atomic_output_dir
    from dualbrain.exporter.align import AlignOptions, Sequences, parse_links
    from dualbrain.exporter.align import align as run_align
    from dualbrain.exporter.export import export_bridges, export_checkpoint
    from dualbrain.exporter.tiny import write_checkpoint

    task = recipe.task
    rec = Record(asdict(recipe))
    held = task.held_out_questions(recipe.questions)

    def timed(stage: str, fn):
        t = time.perf_counter()
        result = fn()
        rec.seconds[stage] = round(time.perf_counter() - t, 1)
        return result

    def train(stage, model_params, loss_of, sample, sched, seed):
        losses = timed(stage, lambda: fit(model_params, loss_of, sample, sched, seed, stage, progress))
        rec.final_loss[stage] = round(sum(losses[-20:]) / len(losses[-20:]), 4)

    with atomic_output_dir(out) as part:
        pair = PairDir(part)
        small = new_model("dense", recipe.seed + 1, recipe.hidden_size, recipe.layers)
        train("small", list(small.parameters()), lambda ex: lm_loss(small, ex, task.eos), task.facts,
              recipe.small, recipe.seed + 10)
        small.eval()
        names = task.names
        rec.train_accuracy["small_names"] = accuracy(small, task, [task.encode(n) for n in names],
                                                     [task.encode(str(task.digit[n])) for n in names])
        write_checkpoint(small, pair.small_checkpoint, family="dense", layout="conditional")

        large = new_model("moe", recipe.seed + 2, recipe.hidden_size, recipe.layers)
        train("large", [p for n, p in large.named_parameters() if "visual" not in n],
              lambda ex: lm_loss(large, ex, task.eos), task.sum_example, recipe.large, recipe.seed + 11)
        large.eval()
        for p in large.parameters():
            p.requires_grad_(False)
        rec.train_accuracy["large_digits"] = accuracy(
            large, task, [task.encode(q.digit_prompt) for q in held], [task.encode(q.answer) + [task.eos] for q in held])
        mtp = MtpHead(large, recipe.seed + 3)
        train("mtp", mtp.parameters(), lambda ex: mtp.loss(ex, task.eos), task.sum_example, recipe.mtp,
              recipe.seed + 12)
        write_checkpoint(large, pair.large_checkpoint, family="moe", layout="conditional", mtp=mtp.tensors())

        qs = task.bridge_questions(len(task.train_names) ** 2)
        data = Sequences.examples([(task.encode(q.prompt), task.encode(q.answer) + [task.eos]) for q in qs], task.eos)
        b = recipe.bridges
        losses = timed("bridges", lambda: run_align(
            pair.small_checkpoint, pair.large_checkpoint, pair.bridges_trained, links=parse_links(recipe.links),
            data=data, heads=recipe.bridge_heads,
            opts=AlignOptions(steps=b.steps, batch=b.batch, lr=b.lr, warmup=b.warmup, floor=b.floor, seed=recipe.seed,
                              save_every=b.steps), progress=progress))
        rec.final_loss["bridges"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)

        def export():
            for ckpt, onnx in ((pair.small_checkpoint, pair.small), (pair.large_checkpoint, pair.large)):
                export_checkpoint(ckpt, onnx, progress=progress)
                # the manifest names its checkpoint by path: the one beside it, wherever DIR goes
                man = json.loads((onnx / "manifest.json").read_text())
                man["source"]["checkpoint"] = f"../{ckpt.name}"
                (onnx / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
            export_bridges(pair.bridges_trained, pair.bridges)
        timed("export", export)
        with open(pair.questions, "w", encoding="utf-8") as f:
            for q in held:
                f.write(json.dumps({"prompt": q.prompt, "answer": q.answer, "digit_prompt": q.digit_prompt,
                                    "facts": {n: str(d) for n, d in zip(q.names, q.digits)}}) + "\n")
        (part / "recipe.json").write_text(json.dumps(asdict(rec), indent=1) + "\n", encoding="utf-8")
    return rec
