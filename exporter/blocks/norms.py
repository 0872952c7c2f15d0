"""Normalisations and rotary embedding shared by the blocks (same casts as the reference)."""
from __future__ import annotations

import torch


def rms_norm_zero_centred(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5 RMSNorm: `x̂ * (1 + w)` computed in fp32, cast back to the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def rms_norm_gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm: plain RMSNorm (x̂ in fp32, cast to the input dtype) × w × silu(gate in fp32)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    return (y * torch.nn.functional.silu(gate.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, head_dim: int):
    """cos/sin of shape (B, T, head_dim) for text positions, as `apply_rotary` reads them.

    For text every mrope section sees the same position, so mrope reduces to plain rope on the
    first `rotary_dim` dims (rotate-half convention). The dims past them pass through: cos 1, sin 0.
    rotate-half's minus sign is sin's, on the first half of the rotary dims.
    """
    freqs = position_ids[..., None].float() * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    passing = (0, head_dim - 2 * inv_freq.shape[0])
    cos = torch.nn.functional.pad(torch.cat((cos, cos), dim=-1), passing, value=1.0)
    sin = torch.nn.functional.pad(torch.cat((-sin, sin), dim=-1), passing, value=0.0)
    return cos.to(dtype), sin.to(dtype)


def rotate_half_index(rotary_dim: int, head_dim: int) -> torch.Tensor:
    """The head dims in rotate-half order: the rotary dims' halves swapped, the rest in place."""
    half = rotary_dim // 2
    return torch.cat((torch.arange(half, rotary_dim), torch.arange(half), torch.arange(rotary_dim, head_dim)))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_half: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos/sin: (B, T, head_dim) from `rotary_cos_sin`; `rotate_half_index`.

    The same products and sums as rotating the first dims and concatenating the rest (bit for bit:
    the passing dims are x * 1 + x * 0), written over the whole head so that a layer's rotary is four
    nodes (Mul, Gather, Mul, Add) rather than slices, a negation and concatenations.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + x.index_select(-1, rotate_half) * sin
