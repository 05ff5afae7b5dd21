"""Multi-head Latent Attention (DeepSeek-V2/V3), with the "absorb" latent KV cache.

Shapes: B batch, T new tokens, S attended slots, D hidden, H heads, R kv_lora_rank, P qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.

    q        = q_b(norm(q_a(x)))  or  q_proj(x)              [B,T,H,N+P]
    c_kv,k_pe = kv_a_proj_with_mqa(x)                          [B,T,R], [B,T,P]  (k_pe shared by all heads)
    k_nope,v  = kv_b_proj(norm(c_kv))                          [B,T,H,N], [B,T,H,V]
    out      = o_proj(softmax(q.k / sqrt(N+P)) v)

Absorb mode (decoding: `MLA.step`, written out in mla_decode.py) folds kv_b_proj into the query and the output, so attention runs directly on the cached
latent: q_lat = q_nope W_UK [B,T,H,R]; scores = [q_lat, q_pe] . [c_kv, k_pe]; out = (p c_kv) W_UV^T.
That is multi-query attention with one (R+P)-wide key head and one R-wide value head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .mla_decode import latent_decode, rope_matrix
from .norm import RMSNorm
from .rope import apply_rope

# With a latent cache and no gradients, chunks longer than this expand the cached latent to per-head K/V
# (cheaper for prefill); shorter ones (decoding, speculative verification) attend in absorbed form (`step`).
ABSORB_MAX_CHUNK = 8
# Training in bf16 on CPU: causal attention by blocked matmuls while B*H*T*S is at most this (else flash).
BLOCKED_MAX_SCORES = 1 << 25
# The latent norms (q_a_layernorm, kv_a_layernorm) use a fixed eps, not config.rms_norm_eps, in DeepSeek's
# reference code and in `transformers`.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    """Multi-head Latent Attention; parameter names follow `transformers`' DeepseekV3Attention."""

    def __init__(self, config) -> None:
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.num_heads = h
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = config.softmax_scale
        self.interleave = config.rope_interleave
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)
        self.decode_fold: bool | None = None  # decoding: fold kv_b_proj into q/o (None: mla_decode.fold_pays decides)

    # ------------------------------------------------------------------ pieces
    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> q_nope [B,T,H,N], q_pe [B,T,H,P] (rotated)."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.num_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B,T,D] -> [norm(c_kv), rope(k_pe)] [B,T,R+P], what the latent cache stores."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        return torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B,S,R+P] -> k [B,S,H,N+P], v [B,S,H,V]."""
        b, s, _ = latent.shape
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, s, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, s, self.num_heads, self.rope_dim)], dim=-1)
        return k, v

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              pad: bool = False) -> torch.Tensor:
        """q [B,T,H,E], k [B,S,H,E], v [B,S,H,V] -> [B,T,H*V]; causal when mask is None.

        `pad` zero-pads the narrower of E and V to the wider one (scores and outputs are unchanged), so
        that torch can use its fused flash kernel, which needs equal head dims, instead of the math path.
        """
        b, t = q.shape[:2]
        e, vd = q.shape[-1], v.shape[-1]
        if pad and e > vd:
            v = F.pad(v, (0, e - vd))
        elif pad and vd > e:
            q, k = F.pad(q, (0, vd - e)), F.pad(k, (0, vd - e))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None and t > 1, scale=self.scale)
        if out.shape[-1] != self.v_dim:
            out = out[..., : self.v_dim]
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_dim)

    def _use_blocked(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """bf16 on CPU with a small score matrix: torch's flash kernel is slower there than two matmuls."""
        dev = q.device.type
        bf16 = q.dtype == torch.bfloat16 or (torch.is_autocast_enabled(dev)
                                             and torch.get_autocast_dtype(dev) == torch.bfloat16)
        b, t, h, _ = q.shape
        return (dev == "cpu" and bf16 and t > 1 and b * h * t * k.shape[1] <= BLOCKED_MAX_SCORES
                and not (self.training and self.dropout > 0))

    def _causal_blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention as two query blocks of matmul + fp32 softmax (the upper-right quarter skipped).

        q, k [B,T,H,E], v [B,T,H,V] -> [B,T,H*V].
        """
        b, t, h, _ = q.shape
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,*]
        half = (t + 1) // 2
        outs = []
        for start, qb in zip((0, half), q.split(half, dim=2)):
            end = start + qb.shape[2]
            scores = torch.matmul(qb, k[:, :, :end].transpose(-1, -2)) * self.scale  # [B,H,t_blk,end]
            keep = torch.ones(qb.shape[2], end, dtype=torch.bool, device=q.device).tril(start)
            probs = scores.float().masked_fill(~keep, float("-inf")).softmax(-1).to(scores.dtype)
            outs.append(torch.matmul(probs, v[:, :, :end]))
        return torch.cat(outs, dim=2).transpose(1, 2).reshape(b, t, h * self.v_dim)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,T,D], cos/sin [B,T,P/2], mask bool [B,1,T,S] (None = causal over x) -> [B,T,D].

        With `cache`, the T new entries are written at `slots` [B,T] and attention covers the S = mask.shape[-1]
        first slots of each row. A short chunk on the latent cache without gradients is a decoding step
        (`step`); longer chunks (prefill) expand the cached latent to per-head keys and values.
        """
        if cache is not None and cache.mode == "latent" and x.shape[1] <= ABSORB_MAX_CHUNK \
                and not torch.is_grad_enabled():
            return self.step(x, rope_matrix(cos, sin, self.interleave, self.rope_dim), ~mask, cache, layer, slots)
        q_nope, q_pe = self._query(x, cos, sin)
        latent = self._latent(x, cos, sin)
        if cache is None:
            k, v = self._expand(latent)
            q = torch.cat([q_nope, q_pe], dim=-1)
            if mask is None and self._use_blocked(q, k):
                out = self._causal_blocked(q, k, v)
            else:
                out = self._sdpa(q, k, v, mask, pad=True)
        elif cache.mode == "naive":
            k_new, v_new = self._expand(latent)
            cache.write(layer, slots, k_new, v_new)
            k, v = cache.read(layer, mask.shape[-1])
            out = self._sdpa(torch.cat([q_nope, q_pe], dim=-1), k, v, mask)
        else:
            cache.write(layer, slots, latent)
            cached, _ = cache.read(layer, mask.shape[-1])
            k, v = self._expand(cached)
            out = self._sdpa(torch.cat([q_nope, q_pe], dim=-1), k, v, mask)
        return self.o_proj(out)

    def step(self, x: torch.Tensor, rope: torch.Tensor, hidden_mask: torch.Tensor, cache: KVCache, layer: int,
             slots: torch.Tensor) -> torch.Tensor:
        """A decoding step on the latent cache, no gradients: x [B,T,D] -> [B,T,D] (T <= ABSORB_MAX_CHUNK).

        rope [B,T,P,P] from `mla_decode.rope_matrix` (built once per model step, shared by the layers);
        hidden_mask bool [B,1,T,S] is True where a query must NOT look. Absorbed attention on the cached
        latent (see `nn.mla_decode`): the same values as `forward` with the cache.
        """
        return latent_decode(self, x, rope, hidden_mask, cache, layer, slots)

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities of a cache-free forward: x [B,T,D], cos/sin [B,T,P/2], mask bool [B,1,T,T]
        (True = may attend; None = causal) -> probs [B,H,T,T] (fp32; rows sum to 1).

        The same q/k as `forward` (full per-head K, no cache), softmax in fp32 as `transformers`' eager path.
        """
        q_nope, q_pe = self._query(x, cos, sin)
        k, _ = self._expand(self._latent(x, cos, sin))
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2).float()  # [B,H,T,E]
        scores = torch.matmul(q, k.transpose(1, 2).float().transpose(-1, -2)) * self.scale  # [B,H,T,T]
        t = x.shape[1]
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
