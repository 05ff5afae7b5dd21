"""Pieces of the decoding step that `torch.compile` can capture whole (no data-dependent Python).

Shapes: B rows, S cached slots, D hidden, E routed experts, K experts per token, F expert width.

The eager decoding step (`MoE.step`, `KVCache.prepare/commit`) reads routing decisions and cache lengths
back into Python; a captured step cannot. `SeekForCausalLM.static_decode_step` runs the same layers with
the two pieces here instead:
  * `SlotStorage`: what `mla_decode.latent_decode` needs from a KVCache (write the new latent at its slot,
    read the first S slots), over the raw preallocated per-layer storage, written in place;
  * `gathered_experts` / `static_ffn`: the routed experts of each token as reductions over the chosen
    experts' weight rows gathered by index -- under inductor the gather fuses into the reduction loops,
    so only the K chosen experts' weights are read, in place, and no shape depends on the routing. (Also
    for the few tokens of a speculative verification: running every expert on every token instead read
    each expert once but cost more than the gathered reductions, 1.09x vs 1.33x compiled greedy on the
    quickstart model, because a CPU step of a small model is bound by arithmetic more than by bytes.)
`static_layer` is one decoder layer of such a step (the main layers and the MTP blocks share it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mla_decode import STATIC_FOLD_MAX_GROWTH, decode_folds, latent_decode
from .moe import Experts, MoE
from .norm import rms_norm


class SlotStorage:
    """A KVCache stand-in over per-layer latent storage k[i] [B,S_max,R+P] (layers first_layer + i)."""

    def __init__(self, k: list[torch.Tensor], first_layer: int = 0) -> None:
        self.k, self.first_layer = k, first_layer

    def write(self, layer: int, slots: torch.Tensor, k_new: torch.Tensor, v_new=None) -> None:
        """Put k_new [B,T,R+P] at slots [B,T] of `layer`, in place."""
        buf = self.k[layer - self.first_layer]
        rows = torch.arange(buf.shape[0], device=buf.device)[:, None]
        buf.index_put_((rows, slots), k_new.to(buf.dtype))

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, None]:
        """The first `length` slots of `layer`: [B,length,R+P] (a view)."""
        return self.k[layer - self.first_layer][:, :length], None


def gathered_experts(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:,k] * expert_{indices[:,k]}(x): x [N,D], indices/weights [N,K] -> [N,D] (== Experts.forward
    up to fp32 rounding), as reductions over the gathered weight rows of the chosen experts."""
    w_gu, w_down = experts.local_weights()  # [E,2F,D], [E,D,F]
    idx = indices - experts.first_expert
    gu = (w_gu[idx] * x[:, None, None, :]).sum(-1)  # [N,K,2F]
    gate, up = gu.chunk(2, dim=-1)
    act = F.silu(gate) * up * weights.to(x.dtype)[..., None]  # [N,K,F]
    return (w_down[idx] * act[:, :, None, :]).sum(-1).sum(1)  # [N,D]


def static_ffn(mlp, x: torch.Tensor) -> torch.Tensor:
    """A decoder layer's FFN on x [B,T,D] -> [B,T,D]: `MLP.step`, or shared experts + gathered routed experts."""
    if not isinstance(mlp, MoE):
        return mlp.step(x)
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    routing = mlp.gate(flat)
    out = gathered_experts(mlp.experts, flat, routing.indices, routing.weights)
    if mlp.shared_experts is not None:
        out = out + mlp.shared_experts.step(flat)
    return out.view(b, t, d)


def static_layer(layer, x: torch.Tensor, rope: torch.Tensor, hidden_mask: torch.Tensor, storage: SlotStorage,
                 slots: torch.Tensor) -> torch.Tensor:
    """`DecoderLayer.step` without data-dependent Python: x [B,T,D] -> [B,T,D]; rope [B,T,P,P], hidden_mask bool
    [B,1,T,S] (True = hidden), the T new latents written at slots [B,T] of `storage`. The attention folds its
    absorbed weights only when that does not grow them (bytes decide in a compiled step)."""
    fold = decode_folds(layer.self_attn, STATIC_FOLD_MAX_GROWTH)
    x = x + latent_decode(layer.self_attn, rms_norm(x, layer.input_layernorm), rope, hidden_mask, storage,
                          layer.layer_idx, slots, fold)
    return x + static_ffn(layer.mlp, rms_norm(x, layer.post_attention_layernorm))


def static_blocker(model) -> str | None:
    """Why `model`'s decoding step cannot be captured (None: it can): every module must be a plain float one
    (a quantized or adapter-wrapped projection has its own kernels and Python)."""
    for name, mod in model.named_modules():
        kind = type(mod)
        if kind.__module__.endswith("nn.quant") or "lora" in kind.__name__.lower():
            return f"module {name} is a {kind.__name__}"
        if isinstance(mod, MoE) and type(mod.experts) is not Experts:
            return f"{name}.experts is a {type(mod.experts).__name__}, not plain Experts"
    return None
