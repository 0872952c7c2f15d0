"""A bridge between the pair (runtime/bridges.py): gated cross-attention from the large model's
residual stream over the small model's hidden states.

    y   = norm_kv(proj(small_hidden))                 # small width -> large width
    q   = W_q norm_q(hidden);  k = W_k y;  v = W_v y  # heads x head_dim; no rotary (CALM has none)
    out = hidden + tanh(gate) * W_o attention(q, [past_k; k], [past_v; v])   # causal over the slots

The same module is trained by `dualbrain align` (both models frozen, only these weights learn) and
exported as a side block, so what is trained is what runs. Norms are zero-centred like the models'
(`x̂ (1 + w)`, w initialised to 0).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dualbrain.exporter.blocks.layers import visible_keys
from dualbrain.exporter.blocks.norms import rms_norm_zero_centred

PARAMS = ("proj", "norm_q", "norm_kv", "q", "k", "v", "o", "gate")


def _shapes(shape) -> dict[str, tuple[int, ...]]:
    h, hs, inner = shape.hidden_size, shape.small_hidden_size, shape.num_kv_heads * shape.head_dim
    return {"proj": (h, hs), "norm_q": (h,), "norm_kv": (h,), "q": (inner, h), "k": (inner, h), "v": (inner, h),
            "o": (h, inner), "gate": (1,)}


def weight_name(index: int, param: str) -> str:
    """The tensor's name in bridges.safetensors."""
    return f"bridges.{index}.{param}" + ("" if param == "gate" else ".weight")


class Bridge(nn.Module):
    def __init__(self, shape, weights: dict[str, torch.Tensor] | None = None, *, trainable: bool = False,
                 seed: int = 0):
        super().__init__()
        self.shape = shape
        gen = torch.Generator().manual_seed(seed)
        for name, dims in _shapes(shape).items():
            if weights is not None:
                t = weights[name]
            elif name.startswith("norm") or name == "gate":
                t = torch.zeros(dims)                                     # identity norms, closed gate
            else:
                t = torch.randn(dims, generator=gen) * dims[1] ** -0.5    # unit-variance outputs
            setattr(self, name, nn.Parameter(t.clone(), requires_grad=trainable))

    @classmethod
    def from_bridges(cls, shape, tensors: dict[str, torch.Tensor], index: int, dtype=None) -> "Bridge":
        w = {p: tensors[weight_name(index, p)] for p in PARAMS}
        return cls(shape, {k: v.to(dtype) if dtype is not None else v for k, v in w.items()})

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        return {weight_name(index, p): getattr(self, p).detach().contiguous() for p in PARAMS}

    def forward(self, hidden, small_hidden, mask, past_key, past_value):
        s = self.shape
        b, t, _ = hidden.shape
        nh, hd = s.num_kv_heads, s.head_dim
        y = rms_norm_zero_centred(F.linear(small_hidden, self.proj), self.norm_kv, s.rms_norm_eps)
        q = F.linear(rms_norm_zero_centred(hidden, self.norm_q, s.rms_norm_eps), self.q).view(b, t, nh, hd)
        new_key = F.linear(y, self.k).view(b, t, nh, hd).permute(1, 0, 2, 3)      # sequence-major, as cached
        new_value = F.linear(y, self.v).view(b, t, nh, hd).permute(1, 0, 2, 3)
        past = past_key.shape[0]
        key = torch.cat([past_key, new_key]).permute(1, 2, 0, 3)                  # (B, nh, total, hd)
        value = torch.cat([past_value, new_value]).permute(1, 2, 0, 3)
        visible = visible_keys(mask, past, t)
        # written out (not ONNX's Attention op: ONNX Runtime's CPU build failed shape inference on it for
        # this graph); the bridges' few heads keep the score tensor small
        scores = torch.matmul(q.transpose(1, 2), key.transpose(-1, -2)) * hd ** -0.5
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(value.dtype), value)
        out = out.transpose(1, 2).reshape(b, t, nh * hd)
        return hidden + torch.tanh(self.gate).to(hidden.dtype) * F.linear(out, self.o), new_key, new_value
