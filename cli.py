"""The `dualbrain` command line.

Every user-caused problem is a `DualbrainError`: printed on one line, exit code 2, no traceback
(`--debug` shows one). Heavy frameworks are imported inside the commands that need them.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dualbrain.console import progress_bar
from dualbrain.errors import DualbrainError
from dualbrain.exporter.tiny import PRESETS as TINY_PRESETS
from dualbrain.runtime.dtypes import FLOAT_DTYPES, QUANT_MODES
from dualbrain.runtime.solver import MODES as SOLVER_MODES


class _Group(click.Group):
    """Turns DualbrainError into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DualbrainError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="dualbrain")
@click.pass_context
def main(ctx, debug):
    """dualbrain: export, run and check the Qwen3.5 / Qwen3.6 hybrid model family.

    \b
    Typical flow:
      dualbrain make-tiny ckpt              # a small random checkpoint to try things on
      dualbrain export ckpt -o out          # one ONNX graph per block + manifest
      dualbrain generate out --prompt "Hi"  # run it with ONNX Runtime
      dualbrain diff ckpt out               # per-block accuracy vs transformers
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory (written atomically).")
@click.option("--dtype", type=click.Choice(FLOAT_DTYPES), default="float32", show_default=True,
              help="Precision of the exported graphs and weights.")
@click.option("--max-context", type=int, default=None,
              help="Longest sequence the runtime will accept (default: the config's max_position_embeddings).")
@click.option("--window", is_flag=True,
              help="No effect: every export has the window variants (per-position GDN states) for rollback.")
@click.option("--quant", type=click.Choice(QUANT_MODES), default=None,
              help="Blockwise symmetric weight quantization. int8 / int4: the linears (LM head included), "
                   "the MoE experts and the embeddings, on any --dtype (the embeddings and the MoE router "
                   "at 8 bits in int4 too; scales in float16 over float32, as Q8_0 / Q4_0 store theirs); "
                   "ONNX Runtime runs them as MatMulNBits / QMoE / GatherBlockQuantized with int8 "
                   "activations, as llama.cpp's Q8_0 / Q4_0 do. int4-experts: the MoE experts at 4 bits and "
                   "every other weight at 8 (larger and slower than int4, closer to float). "
                   "int4-weight-only: the TensorRT form "
                   "(linears only, --dtype float16 or bfloat16). Norms, convs and the MTP head stay in --dtype.")
@click.option("--block", "quant_block", type=click.Choice(["32", "64", "128"]), default=None,
              help="Quantization block size along the input features (default: 32 for int8/int4, 128 for "
                   "int4-weight-only; smaller where a width needs it). Larger blocks are smaller and faster, "
                   "and agree a little less with the float model: int4 at 64 is llama.cpp Q4_0's size "
                   "(README, 'Quantized exports').")
def export(checkpoint, out, dtype, max_context, window, quant, quant_block):
    """Export CHECKPOINT (a Qwen3.5/3.6 safetensors directory) block by block to ONNX.

    CHECKPOINT may also be bridges written by `dualbrain align`: they export as one block per bridge
    (in --dtype; --max-context and --quant do not apply)."""
    from dualbrain.exporter.export import export_bridges, export_checkpoint
    from dualbrain.runtime.bridges import is_bridges_dir

    if is_bridges_dir(checkpoint):
        if quant or max_context or quant_block:
            raise DualbrainError("--quant, --block and --max-context do not apply to bridges")
        update, bar = progress_bar("exporting bridges")
        with bar:
            export_bridges(checkpoint, out, dtype=dtype, progress=update)
        click.echo(f"exported bridges {checkpoint} -> {out} ({dtype})")
        return
    update, bar = progress_bar("exporting")
    with bar:
        export_checkpoint(checkpoint, out, dtype=dtype, window=window, max_context=max_context, quant=quant,
                          quant_block=int(quant_block) if quant_block else None, progress=update, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"exported {checkpoint} -> {out} ({dtype}{', ' + quant if quant else ''})")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise DualbrainError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise DualbrainError("--ids is empty")
    return ids


def _read_messages(path: Path) -> list:
    try:
        msgs = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DualbrainError(f"messages file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DualbrainError(f"messages file {path} is not valid JSON: {e}") from None
    return msgs


def _options(*decorators):
    """Apply click options in the order they are listed (one list, shared by several commands)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


_prompt_options = _options(
    click.option("--prompt", help="One user message, rendered through the chat template."),
    click.option("--messages", type=click.Path(path_type=Path),
                 help='JSON file: a list of {"role", "content"} messages.'),
    click.option("--ids", help="Comma-separated token ids (bypasses tokenizer and chat template)."),
)

_sampling_options = _options(
    click.option("--max-new-tokens", type=int, default=256, show_default=True),
    click.option("--greedy", is_flag=True, help="Greedy decoding (ignores the sampling options)."),
    click.option("--temperature", type=float, default=None, help="Default: generation_config.json, else Qwen's preset."),
    click.option("--top-p", type=float, default=None),
    click.option("--top-k", type=int, default=None),
    click.option("--presence-penalty", type=float, default=None),
    click.option("--seed", type=int, default=None),
    click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    click.option("--think/--no-think", default=True, show_default=True, help="enable_thinking in the chat template."),
    click.option("--preserve-thinking", is_flag=True, help="Keep earlier turns' reasoning in the prompt."),
)


def _sampling_overrides(max_new_tokens, greedy, temperature, top_p, top_k, presence_penalty, seed, stop) -> dict:
    """The sampling flags as `SamplingParams.replace` overrides, checked before anything loads."""
    from dualbrain.runtime.sampling import default_params

    overrides = dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                     seed=seed, max_new_tokens=max_new_tokens, stop=tuple(stop) or None, greedy=greedy or None)
    default_params(None, True).replace(**overrides)  # reject bad parameters before loading anything
    return overrides


def _prompt_ids(model, prompt, messages, ids, think, preserve_thinking) -> list[int]:
    """--ids as they are, else --prompt / --messages rendered with the model's chat template."""
    if ids is not None:
        return _parse_ids(ids)
    msgs = [{"role": "user", "content": prompt}] if prompt is not None else _read_messages(messages)
    tok = model.tokenizer
    return tok.encode(tok.render(msgs, enable_thinking=think, preserve_thinking=preserve_thinking))


def _streamer(as_json: bool):
    if as_json:
        return None

    def stream(row, tok, delta):
        click.echo(delta, nl=False)
        sys.stdout.flush()
    return stream


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@_prompt_options
@click.option("--batch", "batch_file", type=click.Path(path_type=Path),
              help="JSONL file of requests, one per line: exactly one of prompt / messages / ids, plus any of "
                   "max_new_tokens, greedy, temperature, top_p, top_k, presence_penalty, seed, stop, think. "
                   "Run together with continuous batching; output one result per request, in input order.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="With --batch: requests decoded together at most.")
@_sampling_options
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt needs a GPU, TensorRT (or TensorRT-RTX) and engines from `dualbrain build`.")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="Engine directory for --backend tensorrt (default: MODEL_DIR/engines).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (new_ids, text, speeds).")
def generate(model_dir, prompt, messages, ids, batch_file, max_batch, max_new_tokens, greedy, temperature, top_p,
             top_k, presence_penalty, seed, stop, think, preserve_thinking, backend, engines, as_json):
    """Generate text from an export in MODEL_DIR: one prompt, or a file of requests (--batch)."""
    from dualbrain.runtime.generate import GenerationStats
    from dualbrain.runtime.generate import generate as run_generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import default_params

    given = [x is not None for x in (prompt, messages, ids, batch_file)]
    if sum(given) != 1:
        raise DualbrainError("give exactly one of --prompt, --messages, --ids or --batch")
    options = {"engines": engines} if backend == "tensorrt" and engines is not None else {}
    if batch_file is not None:
        _generate_batch(model_dir, batch_file, max_batch, backend, options, as_json)
        return
    overrides = _sampling_overrides(max_new_tokens, greedy, temperature, top_p, top_k, presence_penalty, seed, stop)
    model = Model.load(model_dir, backend=backend, **options)
    params = default_params(model.generation_config, think).replace(**overrides)
    prompt_ids = _prompt_ids(model, prompt, messages, ids, think, preserve_thinking)
    stats = GenerationStats()
    gen = run_generate(model, [prompt_ids], params, on_token=_streamer(as_json), stats=stats)[0]
    if as_json:
        click.echo(_result_json(gen, len(prompt_ids), stats.prefill_tokens_per_s, stats.decode_tokens_per_s))
    else:
        click.echo()


@main.command()
@click.option("--large", "large_dir", required=True, type=click.Path(path_type=Path),
              help="The large model's export (System 2): it verifies, and its chat template renders prompts.")
@click.option("--small", "small_dir", type=click.Path(path_type=Path), default=None,
              help="The small model's export (System 1): drafts (speculative), answers (cascade) or feeds the "
                   "bridges (fused).")
@click.option("--bridges", "bridges_dir", type=click.Path(path_type=Path), default=None,
              help="fused: the export of the pair's bridges (dualbrain align, then dualbrain export BRIDGES -o OUT).")
@click.option("--mode", required=True, type=click.Choice(list(SOLVER_MODES)),
              help="; ".join(f"{m.name}: {m.help}" for m in SOLVER_MODES.values()) + ".")
@_prompt_options
@click.option("--draft-tokens", type=int, default=4, show_default=True,
              help="speculative/mtp: the most drafts per round (adapted per row below it); cascade: the window.")
@click.option("--no-adaptive", is_flag=True, help="speculative/mtp: always draft --draft-tokens tokens.")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="cascade: escalate a window when the small model's lowest top-1 probability is below this "
                   "(0: never, above 1: always).")
@click.option("--mtp-feed", type=click.Choice(["final-normed", "pre-norm"]), default="final-normed",
              show_default=True, help="mtp: the target hidden state enters the head after the final norm (vLLM, "
                                      "SGLang) or before it (mlx-lm).")
@_sampling_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: generate --json's fields plus drafted, accepted, acceptance_rate, "
                   "escalations, rounds.")
def solve(large_dir, small_dir, bridges_dir, mode, prompt, messages, ids, draft_tokens, no_adaptive, threshold, mtp_feed,
          max_new_tokens, greedy, temperature, top_p, top_k, presence_penalty, seed, stop, think, preserve_thinking,
          as_json):
    """Run the large and small models together: speculative, mtp, cascade or fused (one request).

    \b
    dualbrain solve --large L_OUT --small S_OUT --mode speculative --prompt "Hi" --json
    dualbrain solve --large L_OUT --mode mtp --ids 1,2,3 --greedy
    dualbrain solve --large L_OUT --small S_OUT --mode fused --bridges B_OUT --prompt "Hi"
    """
    from dualbrain.runtime.generate import GenerationStats
    from dualbrain.runtime.generate import generate as run_generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import default_params
    from dualbrain.runtime.solver import SolverOptions, build_mode
    from dualbrain.runtime.solver.pair import check_pair

    if sum(x is not None for x in (prompt, messages, ids)) != 1:
        raise DualbrainError("give exactly one of --prompt, --messages or --ids")
    SOLVER_MODES[mode].check(small_dir is not None, draft_tokens, bridges_dir is not None)
    if small_dir is not None and not SOLVER_MODES[mode].needs_small:
        raise DualbrainError(f"--mode {mode} runs the large model alone: drop --small")
    overrides = _sampling_overrides(max_new_tokens, greedy, temperature, top_p, top_k, presence_penalty, seed, stop)
    if small_dir is not None:
        check_pair(large_dir, small_dir)                 # before anything loads or runs
    threads = SOLVER_MODES[mode].threads(os.cpu_count() or 1)
    large = Model.load(large_dir, threads=threads[0])
    small = Model.load(small_dir, threads=threads[1]) if small_dir is not None else None
    options = SolverOptions(draft_tokens=draft_tokens, adaptive=not no_adaptive, threshold=threshold,
                            mtp_feed=mtp_feed, bridges=str(bridges_dir) if bridges_dir else None)
    solver = build_mode(mode, large, small, options)
    params = default_params(large.generation_config, think).replace(**overrides)
    prompt_ids = _prompt_ids(large, prompt, messages, ids, think, preserve_thinking)
    stats = GenerationStats()
    gen = run_generate(large, [prompt_ids], params, on_token=_streamer(as_json), stats=stats, mode=solver)[0]
    if as_json:
        click.echo(_result_json(gen, len(prompt_ids), stats.prefill_tokens_per_s, stats.decode_tokens_per_s,
                                mode=mode, drafted=gen.drafted, accepted=gen.accepted,
                                acceptance_rate=gen.acceptance_rate, escalations=gen.escalations, rounds=gen.rounds))
    else:
        click.echo()


def _result_json(gen, prompt_tokens: int, prefill_tps: float, decode_tps: float, **extra) -> str:
    """One result as `generate --json` prints it."""
    return json.dumps({**extra, "new_ids": gen.new_ids, "text": gen.text, "finish_reason": gen.finish_reason,
                       "prompt_tokens": prompt_tokens, "prefill_tokens_per_s": prefill_tps,
                       "decode_tokens_per_s": decode_tps})


def _generate_batch(model_dir, batch_file, max_batch, backend, options, as_json) -> None:
    from dualbrain.runtime.engine import Engine
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.requests import read_requests

    if max_batch < 1:
        raise DualbrainError("--max-batch must be positive")
    specs = read_requests(batch_file)                 # every line checked before anything loads
    model = Model.load(model_dir, backend=backend, **options)
    engine = Engine(model, max_batch=min(max_batch, len(specs)))
    reqs = []
    for spec in specs:            # every request is checked (ids, length) before the engine takes a step
        ids, params = spec.prompt_ids(model), spec.params(model.generation_config)
        try:
            reqs.append(engine.submit(ids, params))
        except DualbrainError as e:
            raise DualbrainError(f"line {spec.line}: {e}") from None
    update, bar = progress_bar("generating")
    with bar:
        while not engine.idle:
            engine.step()
            update("requests", sum(r.done for r in reqs), len(reqs))
    for i, r in enumerate(reqs):
        g = r.result()
        if as_json:
            click.echo(_result_json(g, len(g.prompt_ids), r.prefill_tokens_per_s, r.decode_tokens_per_s, index=i))
        else:
            click.echo(f"--- request {i} (line {specs[i].line}, {g.finish_reason}) ---\n{g.text}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--tolerance", type=float, default=None,
              help="Max allowed max|out-ref|/max|ref| (default: 1e-5 for fp32/bf16, 2e-2 for fp16).")
@click.option("--prompt-len", type=int, default=11, show_default=True)
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="Instead of transformers vs ONNX, compare ONNX Runtime with these TensorRT engines per block "
                   "(needs a GPU that runs them).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {block, output, max_abs, rel, tolerance, ok}.")
def diff(checkpoint, model_dir, tolerance, prompt_len, engines, as_json):
    """Compare every exported block of MODEL_DIR with transformers on CHECKPOINT; exit 1 when over tolerance."""
    from dualbrain.exporter.diff import diff as run_diff
    from dualbrain.exporter.diff import diff_backends, first_failure

    if engines is not None:
        rows = diff_backends(model_dir, engines, tolerance=tolerance)
    else:
        rows = run_diff(checkpoint, model_dir, tolerance=tolerance, prompt_len=prompt_len)
    bad = first_failure(rows)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("block", "output", "step", "max_abs", "rel", "tolerance", "ok")
        for r in rows:
            table.add_row(r.block, r.output, r.step, f"{r.max_abs:.3g}", f"{r.rel:.3g}", f"{r.tolerance:g}",
                          "ok" if r.ok else "[red]OVER[/red]")
        Console().print(table)
        click.echo(f"first block over tolerance: {bad.block} ({bad.output}, {bad.step})" if bad
                   else "all blocks within tolerance")
    if bad:
        sys.exit(1)


@main.command()
@click.argument("small_ckpt", type=click.Path(path_type=Path))
@click.argument("large_ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output directory: bridges.safetensors + bridges.json (written atomically; an interrupted run "
                   "resumes from its last checkpoint).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help='JSONL training data: {"text": ...} (tokenized with the large model\'s tokenizer) or '
                   '{"ids": [...]} per line, cut into --seq-len rows; or {"prompt": ..., "completion": ...} '
                   '(text or ids) per line, one row each, only the completion trained. Default: random ids '
                   '(a smoke run, nothing to learn).')
@click.option("--layers", default=None,
              help="Which large layer reads which small layer: LARGE:SMALL pairs, e.g. 3:1,7:3 (0-based; the "
                   "bridge's output is added after the large layer). Default: after every 4th large layer, "
                   "reading the small layer at the same relative depth.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True, help="Cross-attention heads per bridge.")
@click.option("--head-dim", type=int, default=None, help="Default: the large hidden size / heads (at least 8).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=50, show_default=True, help="Steps between resumable checkpoints.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def align(small_ckpt, large_ckpt, out, data, layers, steps, batch, seq_len, lr, heads, head_dim, seed, save_every,
          device):
    """Train bridges from SMALL_CKPT into LARGE_CKPT with both models frozen (the fused mode's bridges).

    Writes OUT/bridges.safetensors and OUT/bridges.json, which records the two models' identities
    (hashes of their configs, safetensors headers and tokenizer vocabularies): `solve --mode fused`
    refuses bridges made for other models. Export them with `dualbrain export OUT -o B_OUT`.
    """
    from dualbrain.exporter.align import AlignOptions, parse_links
    from dualbrain.exporter.align import align as run_align

    for name, value in (("--steps", steps), ("--batch", batch), ("--seq-len", seq_len), ("--heads", heads),
                        ("--save-every", save_every)):
        if value < 1:
            raise DualbrainError(f"{name} must be at least 1")
    if seq_len < 2:
        raise DualbrainError("--seq-len must be at least 2")
    links = parse_links(layers) if layers else None
    opts = AlignOptions(steps=steps, batch=batch, seq_len=seq_len, lr=lr, seed=seed, save_every=save_every,
                        device=device)
    update, bar = progress_bar("aligning")
    with bar:
        losses = run_align(small_ckpt, large_ckpt, out, links=links, data=data, heads=heads, head_dim=head_dim,
                           opts=opts, progress=update)
    if losses:
        k = max(1, len(losses) // 10)
        click.echo(f"loss {sum(losses[:k]) / k:.4f} (first {k} steps) -> {sum(losses[-k:]) / k:.4f} (last {k})")
    click.echo(f"wrote bridges to {out}")


@main.command("make-tiny")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--family", type=click.Choice(["dense", "moe"]), default="dense", show_default=True)
@click.option("--layout", type=click.Choice(["conditional", "causal"]), default="conditional", show_default=True,
              help="conditional = published *ForConditionalGeneration; causal = text-only *ForCausalLM.")
@click.option("--experts", type=click.Choice(["stacked", "per-expert"]), default="stacked", show_default=True)
@click.option("--dtype", type=click.Choice(FLOAT_DTYPES), default="float32", show_default=True)
@click.option("--shards", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preset", type=click.Choice(TINY_PRESETS), default="tiny", show_default=True,
              help="tiny: hidden 64, 4 layers (tests). mid: hidden 1024, 12 layers, vocab 32000; with --family moe "
                   "64 experts top-8, about 2.8 GB in fp32 (the CPU benchmarks' model).")
@click.option("--max-position-embeddings", type=click.IntRange(min=1), default=None,
              help="The config's context (default: the preset's; the published models say 262144).")
@click.option("--hidden-size", type=click.IntRange(min=8), default=None,
              help="Another width (e.g. a pair's small model).")
@click.option("--num-layers", type=click.IntRange(min=1), default=None, help="Decoder layers (default: the preset's).")
def make_tiny(out, family, layout, experts, dtype, shards, seed, preset, max_position_embeddings, hidden_size,
              num_layers):
    """Write a small random-weight checkpoint in the published layout, with a real tokenizer."""
    from dualbrain.exporter.tiny import make_tiny as run

    run(out, family=family, layout=layout, experts=experts.replace("-", "_"), dtype=dtype, shards=shards, seed=seed,
        preset=preset, max_position_embeddings=max_position_embeddings, hidden_size=hidden_size,
        num_layers=num_layers)
    click.echo(f"wrote {family}/{layout} {preset} checkpoint to {out}")


@main.command()
@click.option("--pair", "pair_dir", type=click.Path(path_type=Path), default=None,
              help="A pair written by `dualbrain train-pair` (default: the committed tiny pair).")
@click.option("--show", "shown", type=click.IntRange(min=1), default=6, show_default=True,
              help="Held-out questions shown with every mode's answer.")
@click.option("--table-questions", type=click.IntRange(min=1), default=100, show_default=True,
              help="Held-out questions the table is measured on.")
@click.option("--random", "random_weights", is_flag=True,
              help="Instead: end to end on a random-weight tiny checkpoint (make-tiny -> export -> diff -> "
                   "generate; needs the export extra).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="With --random: where the checkpoint and its export go.")
@click.option("--family", type=click.Choice(["dense", "moe"]), default="moe", show_default=True,
              help="With --random: the checkpoint's family.")
def demo(pair_dir, shown, table_questions, random_weights, workdir, family):
    """The trained tiny pair answering questions in every mode, then the solver table.

    \b
    The small model (dense Qwen3.5) knows the digits of made-up names; the large one (Qwen3.6 MoE, with
    a trained MTP head) adds digits; fused (bridges trained by `align`) adds names, on names the bridges
    never saw. Speculative and mtp answer exactly as the large model alone does; cascade lets the small
    model answer unless it is unsure. About half a minute on 2 cores; runtime only (no torch).
    """
    if random_weights:
        _demo_random(workdir, family)
        return
    from dualbrain.recipes.pair import TRAINED, PairDir
    from dualbrain.recipes.pair.demo import show_answers
    from dualbrain.runtime.solver.bench import bench_solver, print_solver_report, read_questions

    pair = PairDir(pair_dir).check() if pair_dir is not None else TRAINED.check()
    questions = read_questions(pair.questions)
    show_answers(pair, questions[:shown], click.echo)
    click.echo(f"\nthe table: each mode on the first {table_questions} of the {len(questions)} held-out questions "
               "(`dualbrain bench --solver` asks all of them)")
    update, bar = progress_bar("measuring")
    with bar:
        report = bench_solver(pair.large, pair.small, pair.bridges, questions=questions[:table_questions],
                              progress=update)
    print_solver_report(report)


def _demo_random(workdir: Path, family: str) -> None:
    """make-tiny -> export -> diff -> generate on random weights."""
    from dualbrain.exporter.diff import diff as run_diff
    from dualbrain.exporter.diff import first_failure
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny as run_tiny
    from dualbrain.runtime.generate import GenerationStats
    from dualbrain.runtime.generate import generate as run_generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    ckpt, out = workdir / f"tiny-{family}", workdir / f"tiny-{family}-onnx"
    click.echo(f"1/4 make-tiny {ckpt}")
    run_tiny(ckpt, family=family, layout="conditional", experts="stacked")
    click.echo(f"2/4 export {ckpt} -> {out}")
    update, bar = progress_bar("exporting")
    with bar:
        export_checkpoint(ckpt, out, progress=update)
    click.echo("3/4 diff against transformers")
    rows = run_diff(ckpt, out)
    bad = first_failure(rows)
    worst = max(rows, key=lambda r: r.rel)
    click.echo(f"    {len(rows)} block outputs, worst rel error {worst.rel:.2e} ({worst.block}.{worst.output})"
               + (f"; OVER tolerance at {bad.block}" if bad else ", all within tolerance"))
    click.echo("4/4 generate (greedy, random weights: expect gibberish)")
    model = Model.load(out)
    tok = model.tokenizer
    ids = tok.encode(tok.render([{"role": "user", "content": "Hello! Who are you?"}], enable_thinking=False))
    stats = GenerationStats()
    gen = run_generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=32), stats=stats)[0]
    click.echo(f"    {gen.text!r}")
    click.echo(f"    prefill {stats.prefill_tokens_per_s:.0f} tok/s, decode {stats.decode_tokens_per_s:.0f} tok/s")
    if bad:
        sys.exit(1)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DualbrainError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise DualbrainError(f"{what} must list positive integers, got {text!r}")
    return vals


@main.command()
@click.argument("export", type=click.Path(path_type=Path), required=False)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The export's checkpoint: enables the peers that start from it (transformers eager, "
                   "onnxruntime-genai through its own model builder, when installed).")
@click.option("--prefill", "prefill_lengths", default="64,512,2048", show_default=True,
              help="Prompt lengths to time prefill at (longer than the export's context are skipped).")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes to time decode at.")
@click.option("--new-tokens", type=int, default=200, show_default=True, help="Decode steps per run.")
@click.option("--runs", type=int, default=3, show_default=True, help="Runs per figure (the median is reported).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure every engine this many times, reversing the order every other round, so that the "
                   "machine's drift during the run weighs on all alike: figures are medians over rounds, and "
                   "`versus_llama` gives the median of each round's ratio to each llama.cpp GGUF.")
@click.option("--no-peers", is_flag=True, help="Only dualbrain.")
@click.option("--llama-bench", type=click.Path(path_type=Path), default=None,
              help="llama.cpp's llama-bench binary (default: llama-bench on PATH, when --gguf is given).")
@click.option("--gguf", type=click.Path(path_type=Path), multiple=True,
              help="A GGUF of the same checkpoint for llama-bench (convert it with llama.cpp's converter; "
                   "repeat for its quantized types, e.g. f32, Q8_0, Q4_0).")
@click.option("--precision", "precisions", type=click.Path(path_type=Path), multiple=True,
              help="Another export of the same checkpoint in another precision (e.g. `export --quant int4`); "
                   "repeatable. Each is timed like EXPORT, with its size, its roofline and its top-1 agreement "
                   "with EXPORT over teacher-forced positions.")
@click.option("--agreement-positions", type=click.IntRange(min=1), default=256, show_default=True,
              help="With --precision: teacher-forced positions the agreement is measured over.")
@click.option("--agreement-text", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --precision: prompts (one per line) the reference continues for the agreement check "
                   "(default: seeded random token ids).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Also write the JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--solver", is_flag=True,
              help="Benchmark the solver modes instead: the large model alone, the small one alone, speculative, "
                   "mtp (when the large export has an MTP head), cascade and fused (with --bridges), on the same "
                   "prompts. Alone, --solver runs the committed tiny pair on its 500 held-out questions.")
@click.option("--large", "large_dir", type=click.Path(path_type=Path), default=None,
              help="With --solver: the large model's export (default: EXPORT).")
@click.option("--small", "small_dir", type=click.Path(path_type=Path), default=None,
              help="With --solver: the small model's export (speculative, cascade and fused need it).")
@click.option("--bridges", "bridges_dir", type=click.Path(path_type=Path), default=None,
              help="With --solver: the pair's exported bridges (adds fused).")
@click.option("--draft-tokens", type=int, default=4, show_default=True, help="With --solver: the most drafts a round.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="With --solver: cascade's threshold.")
@click.option("--prompts", "n_prompts", type=int, default=3, show_default=True,
              help="With --solver and no questions: random prompts answered (each alone; latency percentiles "
                   "over them).")
@click.option("--pair", "pair_dir", type=click.Path(path_type=Path), default=None,
              help="With --solver: a pair written by `dualbrain train-pair` (its exports and questions). "
                   "Default, when no --large is given: the committed tiny pair.")
@click.option("--questions", "questions_file", type=click.Path(path_type=Path), default=None,
              help='With --solver: a JSONL of {"prompt": …, "answer": …} to score each mode on (optional '
                   '"digit_prompt" and "facts" add the per-model checks); latency is then per answer.')
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="With --solver: only the first N questions.")
def bench(export, checkpoint, prefill_lengths, batches, new_tokens, runs, rounds, no_peers, llama_bench, gguf,
          precisions, agreement_positions, agreement_text, output, as_json, solver, large_dir, small_dir, bridges_dir,
          draft_tokens, threshold, n_prompts, pair_dir, questions_file, limit):
    """Time an export's prefill and decode beside the peers, in one run, after checking their tokens.

    \b
    Prefill tok/s at each --prefill length, decode tok/s over --new-tokens at each --batch, ms/token
    P50/P95, peak RSS per engine (each runs in its own process), the export's size, and the roofline:
    the bytes one decode token must read over the bandwidth of a large fp32 matrix-vector product
    measured in the same run. Engines whose greedy tokens differ from dualbrain's are flagged.

    
    Precisions: each --precision export (e.g. the same checkpoint with `export --quant int8` and
    `--quant int4`) is timed the same way and listed with its size, its roofline and its top-1
    agreement with EXPORT over --agreement-positions teacher-forced positions (EXPORT's own greedy
    text). Each --gguf (llama.cpp's f32, Q8_0, Q4_0 of the same checkpoint) runs under llama-bench in
    the same run, so the speeds compare; with --rounds N each engine is measured N times in alternating
    order and each dualbrain engine's ratio to each GGUF is the median of the per-round ratios.

    \b
    With --solver: the large model alone, the small one alone, and each solver mode, each answering the
    same prompts one at a time (greedy): tok/s, ms/token P50/P95, the speedup over the large model alone
    measured in this run, and for speculative/mtp the acceptance rate, drafts and tokens per round, the
    draft's cost ratio c (its decode step over the large model's) and the speedup the cost model
    (1 - a^(k+1)) / ((1 - a)(k c + 1)) predicts from them; for cascade the escalation rate; for fused
    its overhead (ms/token over large alone's).

    \b
    With questions (--questions, --pair, or nothing: the committed tiny pair's 500 held-out questions)
    each mode's accuracy is scored and latency is per answer; the report adds `baseline` (the most
    common answer's rate) and `knowledge` (the small model on the facts, the large one given them).
    """
    from dualbrain.bench import BenchConfig, print_report
    from dualbrain.bench import bench as run_bench

    if solver:
        _bench_solver(large_dir or export, small_dir, bridges_dir, pair_dir, questions_file, limit, new_tokens,
                      draft_tokens, threshold, n_prompts, output, as_json)
        return
    if export is None:
        raise DualbrainError("give the export to benchmark: dualbrain bench OUT [--checkpoint CKPT]")
    if new_tokens < 2 or runs < 1:
        raise DualbrainError("--new-tokens must be at least 2 and --runs at least 1")
    for path in gguf:
        if not Path(path).is_file():
            raise DualbrainError(f"--gguf {path}: no such file")
    for path in precisions:
        if not (Path(path) / "manifest.json").is_file():
            raise DualbrainError(f"--precision {path}: not an export (no manifest.json)")
    cfg = BenchConfig(prefill=_ints(prefill_lengths, "--prefill"), batches=_ints(batches, "--batch"),
                      new_tokens=new_tokens, runs=runs, rounds=rounds)
    update, bar = progress_bar("benchmarking")
    with bar:
        report = run_bench(export, checkpoint, cfg=cfg, peers=not no_peers,
                           llama=str(llama_bench) if llama_bench else None, ggufs=gguf, precisions=precisions,
                           agreement_positions=agreement_positions, agreement_text=agreement_text,
                           progress=update)
    _report(report, output, as_json, print_report)


def _report(report: dict, output: Path | None, as_json: bool, show) -> None:
    """A bench report: written to `output` if given; printed as JSON or shown as a table."""
    text = json.dumps(report, indent=1)
    if output is not None:
        Path(output).write_text(text + "\n", encoding="utf-8")
    if as_json:
        click.echo(text)
    else:
        show(report)


def _bench_solver(large, small, bridges, pair_dir, questions_file, limit, new_tokens, draft_tokens, threshold,
                  n_prompts, output, as_json) -> None:
    from dualbrain.recipes.pair import TRAINED, PairDir
    from dualbrain.runtime.solver.bench import SolverBenchConfig, bench_solver, print_solver_report, read_questions

    if pair_dir is not None or large is None:
        if large is not None or small is not None or bridges is not None:
            raise DualbrainError("--pair gives the large and small models and the bridges: drop --large/--small/--bridges")
        pair = PairDir(pair_dir).check() if pair_dir is not None else TRAINED.check()
        large, small, bridges = pair.large, pair.small, pair.bridges
        questions_file = questions_file or pair.questions
    if new_tokens < 2 or draft_tokens < 1 or n_prompts < 1:
        raise DualbrainError("--new-tokens must be at least 2, --draft-tokens and --prompts at least 1")
    questions = read_questions(questions_file)[:limit] if questions_file is not None else None
    cfg = SolverBenchConfig(new_tokens=new_tokens, draft_tokens=draft_tokens, threshold=threshold, prompts=n_prompts)
    update, bar = progress_bar("benchmarking")
    with bar:
        report = bench_solver(large, small, bridges, cfg=cfg, questions=questions, progress=update)
    _report(report, output, as_json, print_solver_report)


def _register_build() -> None:
    from dualbrain.recipes.cli import build

    main.add_command(build)


def _register_train_pair() -> None:
    from dualbrain.recipes.pair.cli import train_pair

    main.add_command(train_pair)


def _register_serve() -> None:
    from dualbrain.runtime.serve.cli import serve

    main.add_command(serve)


_register_build()
_register_serve()
_register_train_pair()

if __name__ == "__main__":
    main()
