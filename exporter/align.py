"""`dualbrain align`: train the bridges between a pair with both models frozen (runtime/bridges.py).

The pair runs as transformers' own modeling code runs it (`Composition`): the small model's hidden
states are captured after its linked layers by forward hooks, and each bridge adds its gated
cross-attention to the large model's residual stream after its large layer, by a hook on that
layer's output. Only the bridges learn (next-token cross-entropy of the large model's logits).
`Composition` is also the PyTorch reference the fused runtime is tested against.

Resumable: every `save_every` steps the bridges, the optimizer and the data position are saved in
`OUT.partial/`; Ctrl-C keeps them, and the same command resumes from the last save. The result is
`bridges.safetensors` + `bridges.json` (which two models it belongs to: their identities).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dualbrain.errors import DualbrainError, read_jsonl
from dualbrain.runtime.bridges import WEIGHTS, BridgeConfig, BridgeShape, Link

STATE = "align-state.pt"


def default_links(large_layers: int, small_layers: int, every: int = 4) -> tuple[Link, ...]:
    """CALM's layout: a bridge after every `every`-th large layer, reading the small layer at the same
    relative depth."""
    return tuple(Link(i, max(0, round((i + 1) * small_layers / large_layers) - 1))
                 for i in range(every - 1, large_layers - 1, every)) or (Link(0, 0),)


def parse_links(text: str) -> tuple[Link, ...]:
    """"LARGE:SMALL,…" -> links."""
    try:
        links = tuple(Link(*(int(x) for x in part.split(":"))) for part in text.split(",") if part.strip())
    except (TypeError, ValueError):
        raise DualbrainError(f"--layers must be LARGE:SMALL pairs separated by commas, got {text!r}") from None
    if not links:
        raise DualbrainError("--layers is empty")
    return links


def _load(ckpt: Path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _decoder_layers(model):
    body = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return body.layers


def new_config(small_ckpt: Path, large_ckpt: Path, links: Sequence[Link] | None = None, *, heads: int = 4,
               head_dim: int | None = None) -> BridgeConfig:
    """A bridge configuration for the pair, with both models' identities (nothing trained yet)."""
    from dualbrain.exporter.checkpoint import Checkpoint
    from dualbrain.runtime.spec import ModelSpec

    large, small = ModelSpec.from_dir(large_ckpt), ModelSpec.from_dir(small_ckpt)
    if large.vocab_size != small.vocab_size:
        raise DualbrainError(f"the models do not share a vocabulary ({large.vocab_size} vs {small.vocab_size} ids)")
    links = tuple(links) if links else default_links(large.num_layers, small.num_layers)
    for x in links:
        if not (0 <= x.large_layer < large.num_layers and 0 <= x.small_layer < small.num_layers):
            raise DualbrainError(f"--layers {x.large_layer}:{x.small_layer} is outside the models "
                                 f"({large.num_layers} large, {small.num_layers} small layers)")
    if len({x.large_layer for x in links}) != len(links):
        raise DualbrainError("--layers: one bridge per large layer")
    shape = BridgeShape(large.hidden_size, small.hidden_size, heads, head_dim or max(8, large.hidden_size // heads),
                        large.vocab_size, large.rms_norm_eps)
    lg, sm = Checkpoint(large_ckpt, large), Checkpoint(small_ckpt, small)
    lg.validate(), sm.validate()
    ident = lg.identity(), sm.identity()
    if ident[0].get("tokenizer") != ident[1].get("tokenizer"):
        raise DualbrainError("the models' tokenizers differ: they cannot be paired")
    return BridgeConfig(shape, tuple(sorted(links, key=lambda x: x.large_layer)), ident[0], ident[1])


class Composition:
    """small and large (transformers, frozen) with the bridges hooked in; `logits(ids)` runs the pair."""

    def __init__(self, small, large, cfg: BridgeConfig, bridges):
        self.small, self.large, self.cfg, self.bridges = small, large, cfg, list(bridges)
        self._small_hidden: dict[int, object] = {}
        self._mask = None
        self._handles = []
        for j in {x.small_layer for x in cfg.links}:
            self._handles.append(_decoder_layers(small)[j].register_forward_hook(self._capture(j)))
        for bridge, link in zip(self.bridges, cfg.links):
            self._handles.append(_decoder_layers(large)[link.large_layer].register_forward_hook(
                self._apply(bridge, link.small_layer)))
        self._last_small = max(x.small_layer for x in cfg.links)

    @classmethod
    def load(cls, small_ckpt, large_ckpt, cfg: BridgeConfig, bridges) -> "Composition":
        return cls(_load(Path(small_ckpt)), _load(Path(large_ckpt)), cfg, bridges)

    def _capture(self, j: int):
        def fn(mod, args, output):
            self._small_hidden[j] = output[0] if isinstance(output, tuple) else output
        return fn

    def _apply(self, bridge, j: int):
        def fn(mod, args, output):
            import torch

            h = output[0] if isinstance(output, tuple) else output
            b, t, _ = h.shape
            kv = torch.zeros((0, b, bridge.shape.num_kv_heads, bridge.shape.head_dim), dtype=h.dtype)
            mask = self._mask if self._mask is not None else torch.ones((b, t), dtype=torch.int64)
            out = bridge(h, self._small_hidden[j], mask, kv, kv)[0]
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return fn

    def logits(self, ids, attention_mask=None):
        """Logits (B, T, V) of the pair over whole sequences `ids` (B, T)."""
        self._mask = attention_mask
        body = self.small.model.language_model if hasattr(self.small.model, "language_model") else self.small.model
        body(input_ids=ids, attention_mask=attention_mask, use_cache=False)     # fills the captured states
        return self.large(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ---- data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sequences:
    """Training rows (N, T): token ids, attention mask (0 = right padding) and loss mask (1 where the
    next token is trained)."""
    ids: np.ndarray
    attention: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, index) -> "Sequences":
        """The rows `index`, cut to their longest real length."""
        t = max(1, int(self.attention[index].sum(-1).max()))
        return Sequences(self.ids[index, :t], self.attention[index, :t], self.loss[index, :t])

    @classmethod
    def examples(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int) -> "Sequences":
        """(prompt ids, completion ids) pairs, right-padded; only the completion is trained."""
        t = max(len(p) + len(c) for p, c in pairs)
        ids = np.full((len(pairs), t), pad, np.int64)
        attn, loss = np.zeros_like(ids), np.zeros_like(ids)
        for i, (p, c) in enumerate(pairs):
            n = len(p) + len(c)
            ids[i, :n] = list(p) + list(c)
            attn[i, :n] = 1
            loss[i, max(0, len(p) - 1):n - 1] = 1
        return cls(ids, attn, loss)

    @classmethod
    def stream(cls, ids: Sequence[int], seq_len: int) -> "Sequences":
        """One token stream cut into rows of `seq_len`, every position trained."""
        n = len(ids) // seq_len
        rows = np.asarray(ids[:n * seq_len], np.int64).reshape(n, seq_len)
        return cls(rows, np.ones_like(rows), np.ones_like(rows))


def read_sequences(path: Path | None, tokenizer_dir: Path, vocab: int, seq_len: int, seed: int,
                   pad: int = 0) -> Sequences:
    """Training rows from a JSONL file of either {"text": …} or {"ids": […]} lines (concatenated and
    cut into rows of `seq_len`, every token trained) or {"prompt": …, "completion": …} lines (text or
    id lists; one row each, right-padded with `pad`, only the completion trained); text is tokenized
    with the large model's tokenizer. Without a file, random ids (a smoke run)."""
    if path is None:
        return Sequences.stream(np.random.default_rng(seed).integers(0, vocab, 256 * seq_len).tolist(), seq_len)
    tok = None

    def ids_of(value, n: int) -> list[int]:
        nonlocal tok
        if isinstance(value, str):
            if tok is None:
                from dualbrain.runtime.chat import Tokenizer

                tok = Tokenizer.from_dir(tokenizer_dir)
            return tok.encode(value)
        if isinstance(value, list) and all(isinstance(i, int) and 0 <= i < vocab for i in value):
            return value
        raise DualbrainError(f"--data {path}: line {n}: expected text or a list of ids < {vocab}")

    stream: list[int] = []
    pairs: list[tuple[list[int], list[int]]] = []
    for n, d in read_jsonl(path, "--data file"):
        if isinstance(d, dict) and "completion" in d and "prompt" in d:
            pairs.append((ids_of(d["prompt"], n), ids_of(d["completion"], n)))
        elif isinstance(d, dict) and ("text" in d or "ids" in d):
            stream += ids_of(d.get("text", d.get("ids")), n)
        else:
            raise DualbrainError(f'--data {path}: line {n} needs {{"text": …}}, {{"ids": […]}} or '
                                 f'{{"prompt": …, "completion": …}}')
        if pairs and stream:
            raise DualbrainError(f"--data {path}: line {n} mixes prompt/completion lines with text/ids lines")
    if pairs:
        if any(not c for _, c in pairs):
            raise DualbrainError(f"--data {path}: a completion is empty")
        return Sequences.examples(pairs, pad)
    if len(stream) < seq_len:
        raise DualbrainError(f"--data {path}: fewer than {seq_len} tokens")
    return Sequences.stream(stream, seq_len)


def masked_loss(logits, targets, mask):
    """Mean cross-entropy of `logits` (B, T, V) for `targets` (B, T) where `mask` (B, T) is 1."""
    import torch.nn.functional as F

    keep = mask.reshape(-1).bool()      # selected, not multiplied: padded positions may hold anything
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1])[keep].float(), targets.reshape(-1)[keep])


def lr_at(step: int, steps: int, lr: float, warmup: int = 0, floor: float = 1.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `lr` down to `floor * lr` (1: constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass(frozen=True)
class AlignOptions:
    steps: int = 200
    batch: int = 4
    seq_len: int = 64
    lr: float = 1e-3
    seed: int = 0
    save_every: int = 50
    device: str = "cpu"
    warmup: int = 0          # steps of linear warm-up
    floor: float = 1.0       # the learning rate decays (cosine) to floor * lr; 1 keeps it constant


def _key(cfg: BridgeConfig, opts: AlignOptions, data: Sequences) -> str:
    h = hashlib.sha256(json.dumps([cfg.to_json(), opts.__dict__]).encode())
    for a in (data.ids, data.attention, data.loss):
        h.update(a.tobytes())
    return h.hexdigest()


def _pad_id(ckpt: Path) -> int:
    """The checkpoint's pad token (its generation config's), else 0: padded positions are masked."""
    try:
        pad = json.loads((Path(ckpt) / "generation_config.json").read_text()).get("pad_token_id")
    except (OSError, ValueError):
        pad = None
    return pad if isinstance(pad, int) else 0


def align(small_ckpt, large_ckpt, out, *, links: Sequence[Link] | None = None,
          data: "Path | Sequences | None" = None,
          heads: int = 4, head_dim: int | None = None, opts: AlignOptions = AlignOptions(),
          progress: Callable[[str, int, int], None] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train bridges for the pair and write them to `out`; returns the loss of each step run here."""
    import torch

    from dualbrain.artifacts import resumable_output_dir
    from dualbrain.exporter.blocks.bridge import Bridge
    from dualbrain.runtime.manifest import file_digest

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise DualbrainError("--device cuda: no CUDA device here")
    small_ckpt, large_ckpt = Path(small_ckpt), Path(large_ckpt)
    cfg = new_config(small_ckpt, large_ckpt, links, heads=heads, head_dim=head_dim)
    seqs = data if isinstance(data, Sequences) else read_sequences(
        data, large_ckpt, cfg.shape.vocab_size, opts.seq_len, opts.seed, pad=_pad_id(large_ckpt))
    torch.manual_seed(opts.seed)
    bridges = [Bridge(cfg.shape, trainable=True, seed=opts.seed + i) for i in range(len(cfg.links))]
    comp = Composition.load(small_ckpt, large_ckpt, cfg, bridges)
    dev = torch.device(opts.device)
    comp.small.to(dev), comp.large.to(dev)
    for b in bridges:
        b.to(dev)
    params = [p for b in bridges for p in b.parameters()]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    losses: list[float] = []
    with resumable_output_dir(out, _key(cfg, opts, seqs)) as (part, journal):
        step = 0
        if journal.finished("checkpoint") is not None:
            saved = torch.load(part / STATE, weights_only=True)
            for b, sd in zip(bridges, saved["bridges"]):
                b.load_state_dict(sd)
            optim.load_state_dict(saved["optim"])
            step = int(saved["step"])
        order = np.random.default_rng(opts.seed).permutation(np.resize(np.arange(len(seqs)), opts.steps * opts.batch))
        while step < opts.steps:
            if progress:
                progress(f"step {step + 1}", step, opts.steps)
            for group in optim.param_groups:
                group["lr"] = lr_at(step, opts.steps, opts.lr, opts.warmup, opts.floor)
            rows = seqs.rows(order[step * opts.batch:(step + 1) * opts.batch])
            ids, attn, mask = (torch.from_numpy(a).to(dev) for a in (rows.ids, rows.attention, rows.loss))
            loss = masked_loss(comp.logits(ids, attn)[:, :-1], ids[:, 1:], mask[:, :-1])
            optim.zero_grad()
            loss.backward()
            optim.step()
            step += 1
            losses.append(loss.item())
            if on_step:
                on_step(step, losses[-1])
            if step % opts.save_every == 0 or step == opts.steps:
                tmp = part / (STATE + ".tmp")
                torch.save({"bridges": [b.state_dict() for b in bridges], "optim": optim.state_dict(),
                            "step": step}, tmp)
                os.replace(tmp, part / STATE)
                journal.record("checkpoint", {STATE: file_digest(part / STATE)})
        comp.close()
        write_bridges(part, replace(cfg, trained_steps=opts.steps), bridges)
        (part / STATE).unlink()
        if progress:
            progress("done", opts.steps, opts.steps)
    return losses


def write_bridges(directory: Path, cfg: BridgeConfig, bridges) -> None:
    from safetensors.torch import save_file

    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, b in enumerate(bridges):
        tensors.update({k: v.cpu() for k, v in b.tensors(i).items()})
    save_file(tensors, str(Path(directory) / WEIGHTS), metadata={"format": "pt"})
    cfg.write(directory)


def load_bridges(directory, cfg: BridgeConfig | None = None, dtype=None) -> tuple[BridgeConfig, list]:
    """The config and torch bridges of a directory written by `align`."""
    from safetensors.torch import load_file

    from dualbrain.exporter.blocks.bridge import Bridge
    from dualbrain.runtime.bridges import load_config

    cfg = cfg or load_config(directory)
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise DualbrainError(f"{directory}: no {WEIGHTS}")
    tensors = load_file(str(path))
    try:
        return cfg, [Bridge.from_bridges(cfg.shape, tensors, i, dtype) for i in range(len(cfg.links))]
    except KeyError as e:
        raise DualbrainError(f"{path}: missing tensor {e.args[0]}") from None
