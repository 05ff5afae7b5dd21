"""Rotary position embeddings for the rope part of MLA: default and YaRN, interleaved or half layout."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, params: dict[str, Any], max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale ("attention factor") for `rope_parameters`.

    Matches `transformers`' default and YaRN initialisers (DeepSeek-V3's `yarn` with mscale/mscale_all_dim).
    """
    base = float(params.get("rope_theta", 10000.0))
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if params.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings", max_position_embeddings)
    if factor is None:
        factor = max_position_embeddings / orig
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        ms, ms_all = params.get("mscale"), params.get("mscale_all_dim")
        if ms and ms_all:
            attention_factor = _yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Produces cos/sin [B, T, dim/2] for position ids [B, T] (already multiplied by the YaRN factor)."""

    def __init__(self, dim: int, params: dict[str, Any], max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(dim, params, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, H, P] by cos/sin [B, T, P/2].

    interleave=True reads the pairs (x0, x1), (x2, x3), ... as DeepSeek's weights lay them out and returns
    them de-interleaved ([rotated evens, rotated odds]); applied to q and k alike, dot products are unchanged.
    interleave=False uses the rotate-half layout (pairs (x_i, x_{i+P/2})).
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
