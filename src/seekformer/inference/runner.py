"""The decoding hot path: `decode_forward(model, ids, cache)` == `model(ids, cache=cache)`, in fewer ops.

Shapes: B rows, T new tokens (T <= ABSORB_MAX_CHUNK: decoding steps, speculative verification), D hidden,
V vocabulary, E routed experts, K experts per token.

Same math as `SeekForCausalLM.forward` with a latent cache (tests compare the two), without the
per-module call overhead that dominates a CPU decoding step of a small model:
  * RMSNorms use the fused kernel; rope is one rotation matrix per position, built once per step and
    shared by every layer (`nn.mla_decode`);
  * attention is `nn.mla_decode.latent_decode`;
  * a MoE layer with few tokens (B*T*K <= E) runs only the chosen experts, one pair of matmuls each,
    on views of the stacked expert weights (the batched dispatch pays for all E experts).
Anything else (naive cache, long chunks, gradients) falls back to the model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.attention import ABSORB_MAX_CHUNK
from ..nn.few_rows import linear_of, mlp_forward
from ..nn.mla_decode import latent_decode, rms_norm, rope_matrix


def _moe_few_tokens(moe, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE on a handful of tokens: x [B,T,D] -> [B,T,D] (shared experts + the K chosen ones)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    routing = moe.gate(flat)
    out = mlp_forward(moe.shared_experts, flat) if moe.shared_experts is not None else torch.zeros_like(flat)
    experts = moe.experts
    for i, (ids, ws) in enumerate(zip(routing.indices.tolist(), routing.weights.tolist())):
        xi = flat[i:i + 1]
        for e, w in zip(ids, ws):
            out[i:i + 1] += experts.expert_forward(e, xi) * w
    return out.view(b, t, d)


def layer_step(layer, x: torch.Tensor, rope: torch.Tensor, hidden_mask: torch.Tensor, cache, slots: torch.Tensor,
               few_tokens: bool) -> torch.Tensor:
    """One decoder block (`nn.block.DecoderLayer`) on the latent cache: x [B,T,D] -> [B,T,D]."""
    x = x + latent_decode(layer.self_attn, rms_norm(x, layer.input_layernorm), rope, hidden_mask, cache,
                          layer.layer_idx, slots)
    h = rms_norm(x, layer.post_attention_layernorm)
    if not layer.is_moe:
        return x + mlp_forward(layer.mlp, h)
    return x + (_moe_few_tokens(layer.mlp, h) if few_tokens else layer.mlp(h))


def lean_ok(cache, t: int) -> bool:
    """Whether the lean path applies: latent cache, a short chunk, no gradients."""
    return cache.mode == "latent" and t <= ABSORB_MAX_CHUNK and not torch.is_grad_enabled()


def few_tokens(config, n: int) -> bool:
    """Whether n tokens are few enough for MoE layers to run only their chosen experts."""
    return n * config.num_experts_per_tok <= config.n_routed_experts


def decode_forward(model, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
                   last_only: bool = True, return_hidden: bool = False):
    """Logits [B,V] (last_only) or [B,T,V] for input_ids [B,T] appended to `cache`; (logits, hidden [B,T,D])
    with return_hidden (the final-normed states MTP drafting reads)."""
    b, t = input_ids.shape
    if not lean_ok(cache, t):
        out = model(input_ids, attention_mask, cache=cache, return_hidden=return_hidden)
        logits = out.logits[:, -1] if last_only else out.logits
        return (logits, out.hidden_states) if return_hidden else logits
    core = model.model
    x = core.embed_tokens(input_ids)
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    slots, positions, mask = cache.prepare(am)
    cos, sin = core.rotary_emb(positions, x.dtype)
    rope = rope_matrix(cos, sin, model.config.rope_interleave, model.config.qk_rope_head_dim)
    hidden_mask = ~mask
    few = few_tokens(model.config, b * t)
    for layer in core.layers:
        x = layer_step(layer, x, rope, hidden_mask, cache, slots, few)
    cache.commit()
    hidden = rms_norm(x, core.norm)
    logits = linear_of(model.lm_head, hidden[:, -1] if last_only else hidden)
    return (logits, hidden) if return_hidden else logits
