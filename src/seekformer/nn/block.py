"""A pre-norm decoder block: x + MLA(norm(x)), then h + FFN(norm(h)), FFN dense or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from .attention import MLA
from .kv_cache import KVCache
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm, rms_norm


class DecoderLayer(nn.Module):
    """Block `layer_idx`: dense SwiGLU below `first_k_dense_replace`, MoE from there on."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,T,D] -> [B,T,D]; `token_mask` [B,T] excludes padding from MoE balance statistics."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer_idx, slots)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if self.is_moe else self.mlp(h))

    def step(self, x: torch.Tensor, rope: torch.Tensor, hidden_mask: torch.Tensor, cache: KVCache,
             slots: torch.Tensor) -> torch.Tensor:
        """A decoding step on the latent cache (no gradients): x [B,T,D] -> [B,T,D], the values of `forward`.

        rope [B,T,P,P] and hidden_mask bool [B,1,T,S] (True = hidden) as `MLA.step` takes them; the norms
        use the fused kernel, the FFN its few-row path (`MLP.step`, `MoE.step`).
        """
        x = x + self.self_attn.step(rms_norm(x, self.input_layernorm), rope, hidden_mask, cache, self.layer_idx,
                                    slots)
        return x + self.mlp.step(rms_norm(x, self.post_attention_layernorm))
