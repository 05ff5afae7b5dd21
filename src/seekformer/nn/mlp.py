"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .few_rows import linear_of


class MLP(nn.Module):
    """x [..., D] -> [..., D] through an F-wide SwiGLU (`gate_proj`, `up_proj`, `down_proj`, no biases)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for the few rows of a decoding step (each product through `few_rows.linear_of`)."""
        return linear_of(self.down_proj, F.silu(linear_of(self.gate_proj, x)) * linear_of(self.up_proj, x))
