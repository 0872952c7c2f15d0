"""The model's blocks as small torch modules computing the reference math from checkpoint tensors.

Each block is exported to one ONNX graph. Inputs/outputs are explicit (no cache objects): a GDN
layer takes and returns its conv + recurrent state, an attention layer takes past K/V and returns
this call's K/V (both sequence-major; the runtime keeps the cache). The three ops generic compilers
handle badly (causal conv with state, gated delta rule, MoE dispatch) are custom ops from
`dualbrain.plugins`, exported as single nodes.

`runtime.blocks.KINDS` names the module of each block kind; the exporter builds it with
`from_checkpoint(spec, checkpoint, layer, dtype)`. A mixer with state also says how to read
that state out of transformers' cache (`reference_state`, for `diff`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.onnx.ops import attention

from dualbrain.exporter.blocks.norms import (
    apply_rotary, l2norm, rms_norm_gated, rms_norm_zero_centred, rotary_cos_sin, rotate_half_index,
)
from dualbrain.runtime.spec import FULL, LINEAR, ModelSpec
from dualbrain.plugins.causal_conv.op import causal_conv1d
from dualbrain.plugins.gated_delta.op import gated_delta_rule
from dualbrain.plugins.moe_dispatch.op import interleave_gate_up_, moe_dispatch


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = _frozen(weight)

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, ckpt, layer, dtype) -> "Embedding":
        return cls(ckpt.embed_weight(dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class Head(nn.Module):
    """Final norm + LM head; logits are returned in float32 for the sampler."""

    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor]):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.norm = _frozen(w["norm.weight"])
        self.lm_head = _frozen(w["lm_head.weight"])

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, ckpt, layer, dtype) -> "Head":
        return cls(spec, ckpt.head_weights(dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm_zero_centred(hidden, self.norm, self.eps), self.lm_head).float()


class GatedDeltaNetMixer(nn.Module):
    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor]):
        super().__init__()
        self.s = spec
        p = "linear_attn."
        self.in_proj_qkv = _frozen(w[p + "in_proj_qkv.weight"])
        self.in_proj_z = _frozen(w[p + "in_proj_z.weight"])
        self.in_proj_b = _frozen(w[p + "in_proj_b.weight"])
        self.in_proj_a = _frozen(w[p + "in_proj_a.weight"])
        self.conv_weight = _frozen(w[p + "conv1d.weight"][:, 0, :].contiguous())
        self.dt_bias = _frozen(w[p + "dt_bias"])
        self.A_log = _frozen(w[p + "A_log"])
        self.norm = _frozen(w[p + "norm.weight"])
        self.out_proj = _frozen(w[p + "out_proj.weight"])

    @staticmethod
    def reference_state(cache, layer: int, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """Our state inputs from transformers' cache (which keeps K positions of conv input; we keep K-1)."""
        conv = cache.get_conv_state(layer)
        return {"conv_state": conv[..., -(spec.linear_conv_kernel - 1):],
                "recurrent_state": cache.get_recurrent_state(layer)}

    def forward(self, x, mask, conv_state, recurrent_state):
        s = self.s
        b, t, _ = x.shape
        hk, hv, dk, dv = s.linear_num_key_heads, s.linear_num_value_heads, s.linear_key_head_dim, s.linear_value_head_dim
        # Padding tokens get zero inputs: with a zero initial state they leave conv and recurrent state at zero.
        x = x * mask[:, -t:, None].to(x.dtype)
        qkv = F.linear(x, self.in_proj_qkv)
        z = F.linear(x, self.in_proj_z).reshape(b, t, hv, dv)
        beta = torch.sigmoid(F.linear(x, self.in_proj_b))
        g = -self.A_log.float().exp() * F.softplus(F.linear(x, self.in_proj_a).float() + self.dt_bias)
        conv = causal_conv1d(qkv, self.conv_weight, conv_state)
        mixed, new_conv = conv[0], conv[1]
        q, k, v = torch.split(mixed, [hk * dk, hk * dk, hv * dv], dim=-1)
        q = l2norm(q.reshape(b, t, hk, dk).float())
        k = l2norm(k.reshape(b, t, hk, dk).float())
        q = q * dk ** -0.5
        rec = gated_delta_rule(q, k, v.reshape(b, t, hv, dv).float(), g, beta.float(), recurrent_state)
        o = rms_norm_gated(rec[0].to(x.dtype), z, self.norm, s.rms_norm_eps)
        out = F.linear(o.reshape(b, t, hv * dv), self.out_proj)
        # the window variant (exporter.window) swaps both ops for ones that also return per-position states
        return out, new_conv, rec[1]


class GatedAttentionMixer(nn.Module):
    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor]):
        super().__init__()
        self.s = spec
        p = "self_attn."
        self.q_proj = _frozen(w[p + "q_proj.weight"])
        self.k_proj = _frozen(w[p + "k_proj.weight"])
        self.v_proj = _frozen(w[p + "v_proj.weight"])
        self.o_proj = _frozen(w[p + "o_proj.weight"])
        self.q_norm = _frozen(w[p + "q_norm.weight"])
        self.k_norm = _frozen(w[p + "k_norm.weight"])
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.rotary_dim, 2, dtype=torch.float) / spec.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rotate_half", rotate_half_index(spec.rotary_dim, spec.head_dim), persistent=False)

    @staticmethod
    def reference_state(cache, layer: int, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """transformers keeps K/V as (B, nkv, T, hd); ours are sequence-major (T, B, nkv, hd)."""
        return {"past_key": cache.layers[layer].keys.permute(2, 0, 1, 3),
                "past_value": cache.layers[layer].values.permute(2, 0, 1, 3)}

    def forward(self, x, mask, position_ids, past_key, past_value):
        s = self.s
        b, t, _ = x.shape
        nh, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        q, gate = torch.chunk(F.linear(x, self.q_proj).view(b, t, nh, 2 * hd), 2, dim=-1)
        gate = gate.reshape(b, t, nh * hd)
        q = rms_norm_zero_centred(q, self.q_norm, s.rms_norm_eps).transpose(1, 2)
        k = rms_norm_zero_centred(F.linear(x, self.k_proj).view(b, t, nkv, hd), self.k_norm, s.rms_norm_eps).transpose(1, 2)
        v = F.linear(x, self.v_proj).view(b, t, nkv, hd).transpose(1, 2)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, x.dtype, hd)
        q, k = apply_rotary(q, cos, sin, self.rotate_half), apply_rotary(k, cos, sin, self.rotate_half)
        # Past K/V arrive sequence-major (past, B, nkv, hd); this call's K/V leave the same way and the
        # runtime appends them to its cache (runtime.state).
        new_key, new_value = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
        past = past_key.shape[0]
        key = torch.cat([past_key, new_key]).permute(1, 2, 0, 3)          # (B, nkv, total, hd)
        value = torch.cat([past_value, new_value]).permute(1, 2, 0, 3)
        # One ONNX `Attention` node (GQA from the head counts): TensorRT(-RTX) builds it as a fused
        # flash-style kernel in float16/bfloat16, so the (B, heads, seq, total) scores are never
        # materialised at long context. The ONNX Runtime backend runs the same node over the cache as it
        # is: float32 in its CPU kernel (runtime.backends.ort_kernels: CachedAttention), else split into
        # MatMul/Softmax/MatMul (runtime.backends.onnxruntime.split_attention).
        # The mask is per batch row, not per head.
        out = attention(q, key, value, visible_keys(mask, past, t), scale=hd ** -0.5)[0]
        out = out.transpose(1, 2).reshape(b, t, nh * hd)
        out = F.linear(out * torch.sigmoid(gate), self.o_proj)
        return out, new_key, new_value


def visible_keys(mask: torch.Tensor, past: int, seq: int) -> torch.Tensor:
    """(B, 1, seq, past + seq) bool: the keys each new position attends to.

    Query i sits at position past + i and sees key j <= past + i that is not padding (`mask` is
    (B, past + seq), 0 = padding). It always sees itself: a padding query then has one finite score
    instead of none, whose softmax would be NaN and would reach the next layers' states.
    """
    q_pos = torch.arange(seq, device=mask.device)[:, None] + past
    k_pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
    return (((k_pos <= q_pos)[None] & (mask > 0)[:, None, :]) | (k_pos == q_pos)[None])[:, None]


class DenseMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate, self.up, self.down = _frozen(gate), _frozen(up), _frozen(down)

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


class SparseMoE(nn.Module):
    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor]):
        super().__init__()
        self.top_k = spec.num_experts_per_tok
        self.router = _frozen(w["mlp.gate.weight"])
        self.fc1 = _frozen(interleave_gate_up_(w["mlp.experts.gate_up_proj"]))  # in place: no second copy
        self.fc2 = _frozen(w["mlp.experts.down_proj"])
        self.shared = DenseMLP(w["mlp.shared_expert.gate_proj.weight"], w["mlp.shared_expert.up_proj.weight"],
                               w["mlp.shared_expert.down_proj.weight"])
        self.shared_gate = _frozen(w["mlp.shared_expert_gate.weight"])

    def forward(self, x):
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        routed = moe_dispatch(flat, F.linear(flat, self.router), self.fc1, self.fc2, top_k=self.top_k)
        shared = torch.sigmoid(F.linear(flat, self.shared_gate)) * self.shared(flat)
        return (routed + shared).reshape(b, t, h)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: mixer (GDN or gated attention), then MLP or MoE."""

    def __init__(self, spec: ModelSpec, layer_type: str, w: dict[str, torch.Tensor]):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.is_linear = layer_type == LINEAR
        self.input_norm = _frozen(w["input_layernorm.weight"])
        self.post_norm = _frozen(w["post_attention_layernorm.weight"])
        self.mixer = GatedDeltaNetMixer(spec, w) if self.is_linear else GatedAttentionMixer(spec, w)
        if spec.is_moe:
            self.ffn = SparseMoE(spec, w)
        else:
            self.ffn = DenseMLP(w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, ckpt, layer: int, dtype) -> "DecoderLayer":
        return cls(spec, spec.layer_types[layer], ckpt.layer_weights(layer, dtype))

    def forward(self, hidden, attention_mask, *state):
        mixed = self.mixer(rms_norm_zero_centred(hidden, self.input_norm, self.eps), attention_mask, *state)
        hidden = hidden + mixed[0]
        hidden = hidden + self.ffn(rms_norm_zero_centred(hidden, self.post_norm, self.eps))
        return (hidden, *mixed[1:])


class MtpHead(nn.Module):
    """The multi-token-prediction head the checkpoints ship (`mtp.*`): position t reads the hidden
    state at t and the embedding of token t+1 and predicts token t+2,

        x = fc(cat(norm_e(embedded), norm_h(h)))     fc weight [H, 2H], embedding half first
        x = one full-attention decoder layer (x)      with its own K/V cache
        logits = lm_head(mtp.norm(x))                 the model's own lm_head; mtp.norm(x) is also
                                                      the hidden the next chained draft reads

    where h is `hidden`, passed through the model's final norm first when `normalize_hidden` is 1
    (the runtime's switch between final-normed and pre-norm target states: runtime.solver.mtp)."""

    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor]):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.final_norm = _frozen(w["final_norm.weight"])
        self.norm_e = _frozen(w["pre_fc_norm_embedding.weight"])
        self.norm_h = _frozen(w["pre_fc_norm_hidden.weight"])
        self.fc = _frozen(w["fc.weight"])
        self.layer = DecoderLayer(spec, FULL, {k[len("layer."):]: v for k, v in w.items() if k.startswith("layer.")})
        self.norm = _frozen(w["norm.weight"])
        self.lm_head = _frozen(w["lm_head.weight"])

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, ckpt, layer, dtype) -> "MtpHead":
        return cls(spec, ckpt.mtp_weights(dtype))

    def forward(self, hidden, embedded, normalize_hidden, attention_mask, position_ids, past_key, past_value):
        h = torch.where(normalize_hidden.bool(), rms_norm_zero_centred(hidden, self.final_norm, self.eps), hidden)
        x = torch.cat([rms_norm_zero_centred(embedded, self.norm_e, self.eps),
                       rms_norm_zero_centred(h, self.norm_h, self.eps)], dim=-1)
        x, new_key, new_value = self.layer(F.linear(x, self.fc), attention_mask, position_ids, past_key, past_value)
        y = rms_norm_zero_centred(x, self.norm, self.eps)
        return F.linear(y, self.lm_head).float(), y, new_key, new_value
