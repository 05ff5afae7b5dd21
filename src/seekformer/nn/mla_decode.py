"""The decoding step of Multi-head Latent Attention on the latent KV cache ("absorb" mode), lean.

Shapes: B rows, T new tokens (a few: decoding, speculative verification), S cached slots, H heads,
N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim, R kv_lora_rank, D hidden.

Attention runs on the cache as multi-query attention with one (R+P)-wide key head and one R-wide value
head: q_lat = q_nope W_UK [B,T,H,R] (softmax scale folded in); scores = [q_lat, q_pe] . [c_kv, k_pe];
o_lat = softmax(scores) c_kv [B,T,H,R]; out = o_proj(o_lat W_UV^T). The H*T queries are rows of one
batched matmul against the cache (no per-head copy of the cache, unlike SDPA's grouped-query expansion).

Two ways to apply W_UK / W_UV (`fold_pays` chooses per layer; `MLA.decode_fold` forces one):
  * folded: they are multiplied into the projections once (DeepSeek-V2 sec. 2.1.2), so a step is one
    input projection, rope, two attention matmuls and one output projection. The folded matrices are
    H*R wide instead of H*N / H*V: worth it while that growth is small (small models, op-bound on CPU);
  * per head: as DeepSeek's reference inference code, two batched matmuls with slices of kv_b_proj.
Rope is one matmul with a [P,P] rotation per position (`rope_matrix`), shared by q_pe and k_pe and by all
layers of a step. Everything here runs without gradients; training never comes through this file.
"""

from __future__ import annotations

import torch

from .few_rows import few_rows_linear, linear_of as _linear
from .norm import rms_norm
from .rope import apply_rope

# Fold W_UK / W_UV into the projections while that grows the attention weights by at most this factor.
FOLD_MAX_GROWTH = 1.5
# ... in a compiled step (no per-op overhead left to save, bytes read decide): only when they do not grow.
# Measured on the `small` preset with 16 experts, top-4, 1 thread: per-head 1.18x the folded step (tiny 1.09x).
STATIC_FOLD_MAX_GROWTH = 1.0


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor, interleave: bool, dim: int) -> torch.Tensor:
    """cos/sin [B,T,P/2] -> M [B,T,P,P] with apply_rope(x) == x @ M for x [B,T,*,P] (same layout)."""
    b, t = cos.shape[:2]
    eye = torch.eye(dim, dtype=cos.dtype, device=cos.device).expand(b, t, dim, dim)
    return apply_rope(eye, cos, sin, interleave)  # row i = rope(e_i): rope is linear


def fold_pays(attn, max_growth: float = FOLD_MAX_GROWTH) -> bool:
    """Whether folded weights hold at most `max_growth` times the parameters they replace (never for
    quantized projections: folding needs the float matrices)."""
    projs = (attn.q_proj,) if attn.q_lora_rank is None else (attn.q_a_proj, attn.q_b_proj)
    if any(type(m) is not torch.nn.Linear for m in (*projs, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj)):
        return False
    h, n, r, p, v = attn.num_heads, attn.nope_dim, attn.kv_lora_rank, attn.rope_dim, attn.v_dim
    d = attn.o_proj.weight.shape[0]
    d_q = d if attn.q_lora_rank is None else attn.q_lora_rank
    plain = h * (n + p) * d_q + h * (n + v) * r + h * v * d
    folded = h * (r + p) * d_q + h * r * d
    return folded <= plain * max_growth


def folded_weights(attn) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(w_in, b_in, w_qb, w_out) of `attn` with kv_b_proj folded in, rebuilt whenever a weight changes.

    * no q_lora: w_in [H*(R+P) + R+P, D] maps x to H query heads scale*[W_UK^T W_q_nope ; W_q_pe] followed
      by the new latent [c_kv ; k_pe]; w_qb is None;
    * q_lora: w_in [Q + R+P, D] maps x to [q_a ; c_kv ; k_pe] and w_qb [H*(R+P), Q] maps the normed q_a to
      the H absorbed, scaled query heads;
    * w_out [D, H*R] = o_proj with W_UV folded in.
    Kept in `attn.__dict__` (not a buffer: never saved, moved or trained).
    """
    cached = attn.__dict__.get("_folded")
    if cached is not None and torch.compiler.is_compiling():  # a captured step: made fresh before the call
        return cached[1]
    q_w = attn.q_proj.weight if attn.q_lora_rank is None else attn.q_b_proj.weight
    params = (q_w, attn.kv_a_proj_with_mqa.weight, attn.kv_b_proj.weight, attn.o_proj.weight)
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        h, n, r, p, v = attn.num_heads, attn.nope_dim, attn.kv_lora_rank, attn.rope_dim, attn.v_dim
        dtype = attn.kv_b_proj.weight.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w_kv = attn.kv_b_proj.weight.to(acc).view(h, n + v, r)
        w_uk, w_uv = w_kv[:, :n], w_kv[:, n:]  # [H,N,R], [H,V,R]

        def absorb(w_q: torch.Tensor) -> torch.Tensor:  # [H*(N+P), I] -> [H*(R+P), I]
            w_q = w_q.to(acc).view(h, n + p, -1)
            q_lat = torch.einsum("hnr,hni->hri", w_uk, w_q[:, :n])
            return torch.cat([q_lat, w_q[:, n:]], dim=1).reshape(h * (r + p), -1) * attn.scale

        kv_a = attn.kv_a_proj_with_mqa
        if attn.q_lora_rank is None:
            w_in, w_qb = torch.cat([absorb(q_w), kv_a.weight.to(acc)]), None
            b_in = None if kv_a.bias is None else torch.cat([kv_a.bias.new_zeros(h * (r + p)), kv_a.bias])
        else:
            w_in, w_qb = torch.cat([attn.q_a_proj.weight.to(acc), kv_a.weight.to(acc)]), absorb(q_w)
            b_in = None if kv_a.bias is None else torch.cat([attn.q_a_proj.bias, kv_a.bias])
        w_o = attn.o_proj.weight.to(acc).view(-1, h, v)
        w_out = torch.einsum("dhv,hvr->dhr", w_o, w_uv).reshape(w_o.shape[0], h * r)
        out = (w_in.to(dtype), b_in, None if w_qb is None else w_qb.to(dtype), w_out.to(dtype))
    attn.__dict__["_folded"] = (key, out)
    return out


def decode_folds(attn, max_growth: float = FOLD_MAX_GROWTH) -> bool:
    """Whether `attn`'s decoding step runs folded: `attn.decode_fold` when set, else `fold_pays`."""
    return attn.decode_fold if attn.decode_fold is not None else fold_pays(attn, max_growth)


def latent_decode(attn, x: torch.Tensor, rope: torch.Tensor, hidden_mask: torch.Tensor, cache, layer: int,
                  slots: torch.Tensor, fold: bool | None = None) -> torch.Tensor:
    """One MLA step on the latent cache: x [B,T,D] -> [B,T,D] (writes the T new latents at `slots` [B,T]).

    rope [B,T,P,P] from `rope_matrix`; hidden_mask bool [B,1,T,S] (or [B,1,1,S]) is True where a query
    must NOT look (the negation of KVCache.prepare's mask). `fold`: folded weights or per head (None:
    `decode_folds`).
    """
    b, t, _ = x.shape
    h, n, r, e = attn.num_heads, attn.nope_dim, attn.kv_lora_rank, attn.kv_lora_rank + attn.rope_dim
    fold = decode_folds(attn) if fold is None else fold
    if fold:
        w_in, b_in, w_qb, w_out = folded_weights(attn)
        y = few_rows_linear(x, w_in, b_in)
        if w_qb is None:
            q, kv = y.split([h * e, e], dim=-1)
        else:
            qa, kv = y.split([attn.q_lora_rank, e], dim=-1)
            q = few_rows_linear(rms_norm(qa, attn.q_a_layernorm), w_qb)
        q = q.view(b, t, h, e)
        q_lat, q_pe = q[..., :r], q[..., r:]
    else:
        q = _linear(attn.q_proj, x) if attn.q_lora_rank is None else \
            _linear(attn.q_b_proj, rms_norm(_linear(attn.q_a_proj, x), attn.q_a_layernorm))
        q = (q * attn.scale).view(b, t, h, n + attn.rope_dim)
        w_uk = attn.kv_b_proj.weight.view(h, n + attn.v_dim, r)[:, :n]  # [H,N,R]
        q_nope = q[..., :n].reshape(b * t, h, n).transpose(0, 1)  # [H,B*T,N]
        q_lat = torch.bmm(q_nope, w_uk).transpose(0, 1).view(b, t, h, r)
        q_pe = q[..., n:]
        kv = _linear(attn.kv_a_proj_with_mqa, x)
    c_kv, k_pe = kv.split([r, attn.rope_dim], dim=-1)
    rot = torch.matmul(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), rope)  # [B,T,H+1,P]
    latent = torch.cat([rms_norm(c_kv, attn.kv_a_layernorm), rot[:, :, h]], dim=-1)  # [B,T,R+P]
    q = torch.cat([q_lat, rot[:, :, :h]], dim=-1)  # [B,T,H,R+P]
    s = hidden_mask.shape[-1]
    cache.write(layer, slots, latent)
    cached, _ = cache.read(layer, s)  # [B,S,R+P]
    scores = torch.bmm(q.reshape(b, t * h, e), cached.transpose(1, 2)).view(b, t, h, s)
    probs = scores.masked_fill_(hidden_mask.view(b, t, 1, s), float("-inf")).softmax(dim=-1)
    o_lat = torch.bmm(probs.view(b, t * h, s), cached[..., :r])  # [B,T*H,R]
    if fold:
        return few_rows_linear(o_lat.view(b, t, h * r), w_out, attn.o_proj.bias)
    w_uv = attn.kv_b_proj.weight.view(h, n + attn.v_dim, r)[:, n:]  # [H,V,R]
    o = torch.bmm(o_lat.view(b * t, h, r).transpose(0, 1), w_uv.transpose(1, 2))  # [H,B*T,V]
    return _linear(attn.o_proj, o.transpose(0, 1).reshape(b, t, h * attn.v_dim))
