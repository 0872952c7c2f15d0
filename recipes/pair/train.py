"""Training the tiny pair on the CPU: the small model, the large model, the large model's MTP head.

All three train through transformers' own Qwen3.5 / Qwen3.6 classes (the models are written in the
published layout by `exporter.tiny.write_checkpoint`); the MTP head is transformers' full-attention
decoder layer between the published `mtp.*` projections and norms (`MtpHead`), reading the large
model's final-normed hidden state at t and the embedding of token t+1, predicting token t+2.
Only the answer positions of each example are trained (`task.batch`'s loss mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dualbrain.exporter.align import lr_at, masked_loss
from dualbrain.recipes.pair.task import Example, PairTask, batch

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Schedule:
    """Steps of `batch` examples; linear warm-up, then cosine down to `floor * lr`."""
    steps: int
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 20
    floor: float = 0.1

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.steps, self.lr, self.warmup, self.floor)


def fit(params, loss_of: Callable[[list[Example]], object], sample: Callable[[np.random.Generator], Example],
        sched: Schedule, seed: int, what: str, progress: Progress | None = None) -> list[float]:
    """AdamW over `params` for `sched.steps` batches of `sample`d examples; returns the losses."""
    import torch

    rng = np.random.default_rng(seed)
    optim = torch.optim.AdamW(params, lr=sched.lr, weight_decay=0.0)
    losses = []
    for step in range(sched.steps):
        if progress and step % 10 == 0:
            progress(what, step, sched.steps)
        for group in optim.param_groups:
            group["lr"] = sched.lr_at(step)
        loss = loss_of([sample(rng) for _ in range(sched.batch)])
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(loss.item())
    return losses


def lm_loss(model, examples: list[Example], pad: int):
    """The answer positions' loss of a transformers causal LM over right-padded `examples`."""
    import torch

    ids, attn, loss = (torch.from_numpy(a) for a in batch(examples, pad))
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return masked_loss(logits[:, :-1], ids[:, 1:], loss[:, :-1])


def text_model(model):
    """The decoder stack of a *ForConditionalGeneration / *ForCausalLM."""
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


class MtpHead:
    """A trainable MTP head in the published layout around a frozen large model (transformers)."""

    def __init__(self, large, seed: int):
        import torch
        from torch import nn

        text = getattr(large.config, "text_config", large.config)
        moe = text.model_type == "qwen3_5_moe_text"
        if moe:
            from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as mod
            layer_cls, rope_cls = mod.Qwen3_5MoeDecoderLayer, mod.Qwen3_5MoeTextRotaryEmbedding
        else:
            from transformers.models.qwen3_5 import modeling_qwen3_5 as mod
            layer_cls, rope_cls = mod.Qwen3_5DecoderLayer, mod.Qwen3_5TextRotaryEmbedding
        from dualbrain.exporter.tiny import _tiny_init

        self.large, self.eps = large, text.rms_norm_eps
        self.text = text_model(large)
        h = text.hidden_size
        self.layer = layer_cls(text, text.layer_types.index("full_attention"))
        # a lone transformers layer leaves some weights uninitialised (the experts: torch.empty): set them
        # all, as the tiny checkpoints' MTP heads are (`exporter.tiny._mtp_tensors`)
        g = torch.Generator().manual_seed(seed)

        def normal(shape, std, mean=0.0):
            return torch.randn(shape, generator=g) * std + mean

        with torch.no_grad():
            for name, p in self.layer.named_parameters():
                p.copy_(_tiny_init(f"mtp.layers.0.{name}", tuple(p.shape), normal, g))
        torch.manual_seed(seed)
        self.rope = rope_cls(text)
        self.norms = nn.ParameterDict({k: nn.Parameter(torch.zeros(h)) for k in
                                       ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")})
        self.fc = nn.Parameter(torch.randn(h, 2 * h) * (2 * h) ** -0.5)

    def parameters(self):
        return [*self.layer.parameters(), *self.norms.values(), self.fc]

    def _norm(self, x, w):
        return x * (x.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt() * (1 + w)

    def logits(self, ids, attn):
        """(B, T-1, V): position t predicts token t+2 from the hidden state at t and token t+1."""
        import torch

        with torch.no_grad():
            hidden = self.text(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state  # final-normed
            emb = self.text.embed_tokens(ids[:, 1:])
        x = torch.cat([self._norm(emb, self.norms["pre_fc_norm_embedding"]),
                       self._norm(hidden[:, :-1], self.norms["pre_fc_norm_hidden"])], -1) @ self.fc.T
        t = x.shape[1]
        pos = torch.arange(t)[None].expand(x.shape[0], t)
        mask = torch.full((t, t), torch.finfo(x.dtype).min).triu(1)[None, None]
        x = self.layer(x, position_embeddings=self.rope(x, pos), attention_mask=mask, position_ids=pos)
        return self.large.lm_head(self._norm(x, self.norms["norm"]))

    def loss(self, examples: list[Example], pad: int):
        import torch

        ids, attn, loss = (torch.from_numpy(a) for a in batch(examples, pad))
        return masked_loss(self.logits(ids, attn)[:, :-1], ids[:, 2:], loss[:, 1:-1])

    def tensors(self) -> dict:
        """The head's tensors under their published names."""
        out = {f"mtp.layers.0.{k}": v.detach().clone() for k, v in self.layer.state_dict().items()}
        out.update({f"mtp.{k}.weight": v.detach().clone() for k, v in self.norms.items()})
        out["mtp.fc.weight"] = self.fc.detach().clone()
        return out


def new_model(family: str, seed: int, hidden_size: int, layers: int, **config):
    """A transformers model of the tiny preset's shape in the published (conditional) layout, with the
    tiny checkpoints' initialisation except a quieter LM head (a trainable start: loss near ln V).
    `config`: text-config entries that replace the preset's."""
    import torch

    from dualbrain.exporter.tiny import _build_model, _init_tiny_weights, text_config_dict

    cfg = text_config_dict(family=family, num_layers=layers, hidden_size=hidden_size) | config
    torch.manual_seed(seed)
    model = _build_model(family, "conditional", cfg, False)
    _init_tiny_weights(model, seed, False)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    return model.train()


def accuracy(model, task: PairTask, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Greedy exact-match rate of a transformers model (teacher-forced over the answer: every answer
    token must be the argmax), for quick checks during training."""
    import torch

    ex = [Example(tuple(p + a), len(p)) for p, a in zip(prompts, answers)]
    ids, attn, loss = (torch.from_numpy(x) for x in batch(ex, task.eos))
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.argmax(-1)
    ok = ((pred[:, :-1] == ids[:, 1:]) | (loss[:, :-1] == 0)).all(-1)
    return ok.float().mean().item()
