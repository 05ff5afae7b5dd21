"""SeekForCausalLM: the DeepSeek-V3 decoder with an LM head and Multi-Token Prediction modules.

Module and parameter names follow `transformers`' DeepseekV3ForCausalLM (`model.embed_tokens`,
`model.layers.N.self_attn.*`, `model.layers.N.mlp.*`, `model.norm`, `lm_head`), so checkpoints map 1:1;
the only in-memory differences are the stacked expert tensors and the MTP modules (`mtp.K.*`), which
checkpoint.py writes as per-expert keys and as layers `num_hidden_layers + K`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SeekConfig
from ..nn import DecoderLayer, KVCache, MoE, RMSNorm, RotaryEmbedding
from ..nn.attention import ABSORB_MAX_CHUNK
from ..nn import few_rows
from ..nn.few_rows import linear_of
from ..nn.mla_decode import STATIC_FOLD_MAX_GROWTH, decode_folds, folded_weights, rope_matrix
from ..nn.norm import rms_norm
from ..nn.loss import cross_entropy
from ..nn.moe import Experts, Router
from ..nn.static_decode import SlotStorage, static_blocker, static_layer


@dataclass
class CausalLMOutput:
    """What the model returns: `logits` [B,T,V]; `loss` when labels are given (LM + MTP + balance terms)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [B,T] -> boolean attention mask [B,1,T,T]: causal, no padded keys, pads see themselves."""
    t = attention_mask.shape[1]
    keep = attention_mask.to(torch.bool)
    tri = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    visible = tri[None] & keep[:, None, :]
    visible |= torch.eye(t, dtype=torch.bool, device=keep.device)[None]
    return visible[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: [B,T] -> cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)


class SeekModel(nn.Module):
    """Embeddings, decoder blocks and the final norm: input_ids [B,T] -> hidden states [B,T,D]."""

    def __init__(self, config: SeekConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.rope_parameters,
                                          config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, layer_states: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`inputs_embeds` [B,T,D], when given, replaces the token embeddings (input_ids still give B, T).
        `layer_states`, when given, receives the embeddings and every decoder layer's output ([B,T,D] each, not
        normed): what a head reading several depths pools (models/multitask.py `features: layers`)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if layer_states is not None:
            layer_states.append(x)
        b, t = input_ids.shape
        mask = slots = None
        if cache is not None:
            am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            slots, pos, mask = cache.prepare(am)
            position_ids = pos if position_ids is None else position_ids
        else:
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = causal_mask(attention_mask)
                if position_ids is None:
                    position_ids = positions_from_mask(attention_mask)
            if position_ids is None:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, slots, attention_mask)
            if layer_states is not None:
                layer_states.append(x)
        if cache is not None:
            cache.commit()
        return self.norm(x)

    def step(self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
             ) -> torch.Tensor:
        """A decoding step: input_ids [B,T] (T <= ABSORB_MAX_CHUNK) appended to the latent `cache`, no
        gradients -> final-normed hidden states [B,T,D], the values of `forward` with the cache.

        The rope rotation matrix is built once and shared by every layer's `DecoderLayer.step`.
        """
        x = self.embed_tokens(input_ids)
        am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        slots, positions, mask = cache.prepare(am)
        cos, sin = self.rotary_emb(positions, x.dtype)
        rope = rope_matrix(cos, sin, self.config.rope_interleave, self.config.qk_rope_head_dim)
        hidden_mask = ~mask
        for layer in self.layers:
            x = layer.step(x, rope, hidden_mask, cache, slots)
        cache.commit()
        return rms_norm(x, self.norm)


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (DeepSeek-V3 sec. 2.2).

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), h^k = Block(h'), logits = head(shared_head.norm(h^k)).
    The embedding and the output head are the main model's (shared).
    """

    def __init__(self, config: SeekConfig, depth: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = DecoderLayer(config, config.num_hidden_layers + depth)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, slots: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h_prev [B,T,D] (depth k-1), emb_next [B,T,D] (tokens shifted by k) -> normed h^k [B,T,D]."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        h = self.block(h, cos, sin, mask, cache, slots, token_mask)
        return h

    def step(self, h_prev: torch.Tensor, emb_next: torch.Tensor, rope: torch.Tensor, hidden_mask: torch.Tensor,
             cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """`forward` as a decoding step on the latent cache (no gradients): h_prev, emb_next [B,T,D] -> [B,T,D];
        rope [B,T,P,P] and hidden_mask [B,1,T,S] as `DecoderLayer.step` takes them."""
        h = linear_of(self.eh_proj, torch.cat([rms_norm(emb_next, self.enorm), rms_norm(h_prev, self.hnorm)], dim=-1))
        return self.block.step(h, rope, hidden_mask, cache, slots)

    def static_step(self, h_prev: torch.Tensor, emb_next: torch.Tensor, rope: torch.Tensor,
                    hidden_mask: torch.Tensor, storage: SlotStorage, slots: torch.Tensor) -> torch.Tensor:
        """`step` without data-dependent Python (`nn.static_decode.static_layer`), for a captured step."""
        h = linear_of(self.eh_proj, torch.cat([rms_norm(emb_next, self.enorm), rms_norm(h_prev, self.hnorm)], dim=-1))
        return static_layer(self.block, h, rope, hidden_mask, storage, slots)

    def head_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_head.norm(h)


class SeekForCausalLM(nn.Module):
    """DeepSeek-V3 causal LM. `model(input_ids, attention_mask=None, labels=None)` -> CausalLMOutput."""

    def __init__(self, config: SeekConfig) -> None:
        super().__init__()
        self.config = config
        self.model = SeekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(config.num_nextn_predict_layers))
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights (residual projections scaled by 1/sqrt(2L)), unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * max(1, self.config.num_hidden_layers))
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        for m in self.modules():
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # (a norm: never quantized)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(name, module) of every MoE layer, main model first, then MTP blocks."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MoE)]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for n, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and ("embed_tokens" in n or "lm_head" in n)):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0,
                return_hidden: bool = False, inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B,T] -> CausalLMOutput(logits [B,T,V]); labels [B,T] (-100 ignored) add `.loss`.

        The loss is the next-token cross-entropy, plus `mtp_loss_weight` times the mean MTP loss and the
        MoE balance terms in training. `logits_to_keep=n` computes logits for the last n positions only.
        `inputs_embeds` [B,T,D] replaces the token embeddings (e.g. with image tokens spliced in).
        """
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds=inputs_embeds)
        h_keep = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(h_keep)
        out = CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden else None)
        if labels is not None:
            out.lm_loss = shifted_cross_entropy(logits, labels)
            loss = out.lm_loss
            if self.mtp and self.training:
                out.mtp_loss, out.mtp_logits = self._mtp_loss(hidden, input_ids, labels, attention_mask,
                                                              position_ids)
                loss = loss + self.config.mtp_loss_weight * out.mtp_loss
            if self.training:
                aux = [m.aux_loss for _, m in self.moe_layers() if m.aux_loss is not None]
                if aux:
                    out.aux_loss = torch.stack(aux).sum()
                    loss = loss + out.aux_loss
                for _, m in self.moe_layers():
                    m.aux_loss = None
            out.loss = loss
        return out

    def _mtp_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                  attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Depth k predicts token i+k+1 from h^{k-1}_i and Emb(t_{i+k}); returns the mean of the depth losses.

        Slot i keeps the position of token i (as the main model saw it) and is valid when tokens i and i+k
        are both real (not padding).
        """
        losses, all_logits = [], []
        h = hidden
        b, t = input_ids.shape
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                position_ids = positions_from_mask(attention_mask)
            else:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        for k, module in enumerate(self.mtp, start=1):
            n = t - k
            if n < 2:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])
            am = attention_mask[:, :n] * attention_mask[:, k:] if attention_mask is not None else None
            mask = causal_mask(am) if am is not None and not bool(am.all()) else None
            cos, sin = self.model.rotary_emb(position_ids[:, :n], h.dtype)
            h = module(h[:, :n], emb, cos, sin, mask, token_mask=am)
            logits = self.lm_head(module.head_norm(h))
            losses.append(shifted_cross_entropy(logits, labels[:, k:]))
            all_logits.append(logits)
        if not losses:
            return hidden.new_zeros(()), []
        return torch.stack(losses).mean(), all_logits

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
                    last_only: bool = True, return_hidden: bool = False):
        """Append input_ids [B,T] to `cache` and return their logits: [B,V] (last_only) or [B,T,V]; with
        return_hidden, (logits, final-normed hidden [B,T,D]) (what MTP drafting reads).

        The decoding path of the same modules and weights as `forward` (same values up to fp32 rounding):
        on a latent cache a chunk of up to ABSORB_MAX_CHUNK tokens runs `SeekModel.step` (absorbed latent
        attention, few-row products, only the chosen experts); anything else (per-head cache, long chunk)
        is `forward` with the cache.
        """
        if not step_applies(cache, input_ids.shape[1]):
            out = self(input_ids, attention_mask, cache=cache, logits_to_keep=1 if last_only else 0,
                       return_hidden=return_hidden)
            logits = out.logits[:, -1] if last_only else out.logits
            return (logits, out.hidden_states) if return_hidden else logits
        hidden = self.model.step(input_ids, cache, attention_mask)
        logits = linear_of(self.lm_head, hidden[:, -1] if last_only else hidden)
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def decode_products(flag: bool | None, from_rows: int | None = None) -> few_rows.use:
        """Context manager: decoding steps inside it multiply few rows by their weights in `nn.few_rows`'
        W @ X^T form (True), as F.linear (False), or as set (None); `from_rows`: products of at least this many
        rows take the W @ X^T form too (the captured speculative step). Which is faster depends on the CPU:
        the decoders measure both (`inference.decoding.product_form`)."""
        return few_rows.use(flag, from_rows)

    # ------------------------------------------------------------------ capturable decoding step
    def static_step_blocker(self) -> str | None:
        """Why `static_decode_step` cannot serve this model (a quantized or adapter module), None if it can."""
        return static_blocker(self)

    @torch.no_grad()
    def static_step_prepare(self) -> None:
        """Eager work the captured steps rely on, before each call: the folded attention weights are made
        current (the captured step reads them as they are)."""
        folds = self.__dict__.get("_static_folds")  # the attention modules that fold (decided once)
        if folds is None:
            folds = [layer.self_attn for layer in [*self.model.layers, *(m.block for m in self.mtp)]
                     if decode_folds(layer.self_attn, STATIC_FOLD_MAX_GROWTH)]
            self.__dict__["_static_folds"] = folds
        for attn in folds:
            folded_weights(attn)

    def _static_main(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     hidden_mask: torch.Tensor, k: list[torch.Tensor]) -> torch.Tensor:
        """The main model on input_ids [B,T] as a captured step -> final-normed hidden [B,T,D]."""
        inner = self.model
        x = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(positions, x.dtype)
        rope = rope_matrix(cos, sin, self.config.rope_interleave, self.config.qk_rope_head_dim)
        storage = SlotStorage(k)
        for layer in inner.layers:
            x = static_layer(layer, x, rope, hidden_mask, storage, slots)
        return rms_norm(x, inner.norm)

    def static_decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                           hidden_mask: torch.Tensor, k: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_step` of one token per row with no data-dependent Python, for `torch.compile`
        (inference/compiled.py): input_ids/positions/slots [B,1] and hidden_mask bool [B,1,1,S] (True =
        hidden) from `KVCache.prepare`, k the main layers' latent storage [B,S_max,R+P] (the new latents are
        written at `slots` in place; the caller commits) -> (logits [B,V], final-normed hidden [B,1,D]).

        The same layers and weights as `SeekModel.step` (same values up to fp32 rounding); routed experts
        through `nn.static_decode.static_ffn` (the chosen experts' weights gathered by index).
        """
        hidden = self._static_main(input_ids, positions, slots, hidden_mask, k)
        return linear_of(self.lm_head, hidden[:, -1]), hidden

    def static_speculate_step(self, bonus_ids: torch.Tensor, h_pend: torch.Tensor, next_ids: torch.Tensor,
                              last: torch.Tensor, mtp_positions: torch.Tensor, mtp_slots: torch.Tensor,
                              mtp_mask: torch.Tensor, k_mtp: list[torch.Tensor], positions: torch.Tensor,
                              slots: torch.Tensor, hidden_mask: torch.Tensor, k: list[torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One self-speculative step of one row (inference/speculative.py) with no data-dependent Python, for
        `torch.compile`: MTP module 0 drafts K tokens, the main model verifies K+1 tokens, in one graph.

        Shapes (batch 1, W = K+1 catch-up slots, S / S_m cached slots of the main / MTP caches):
          * MTP catch-up on the W (right-padded) confirmed positions it has not seen: h_pend [1,W,D] (their
            main-model hidden states), next_ids [1,W] (the tokens one ahead); `last` [1] the last real one,
            whose output predicts draft 1; drafts 2..K chain the module on its own output (EAGLE-style);
          * mtp_positions/mtp_slots [1,W+K-1] and mtp_mask bool [1,1,W+K-1,S_m] (True = hidden) for the
            catch-up and the K-1 chained positions, from `KVCache.prepare` of the MTP cache; k_mtp its storage;
          * the main model on [bonus_ids [1,1], drafts]: positions/slots [1,K+1], hidden_mask [1,1,K+1,S], k.
        Latents are written in place (the caller commits and rolls back). Returns (drafts [1,K] long, logits
        [1,K+1,V] of the verified positions, final-normed hidden [1,K+1,D]).
        """
        w = h_pend.shape[1]
        n_draft = mtp_slots.shape[1] - w + 1
        module = self.mtp[0]
        embed = self.model.embed_tokens
        cos, sin = self.model.rotary_emb(mtp_positions, h_pend.dtype)
        rope = rope_matrix(cos, sin, self.config.rope_interleave, self.config.qk_rope_head_dim)
        storage = SlotStorage(k_mtp, self.config.num_hidden_layers)
        h = module.static_step(h_pend, embed(next_ids), rope[:, :w], mtp_mask[:, :, :w], storage, mtp_slots[:, :w])
        h = h.index_select(1, last)  # [1,1,D]
        drafts = [linear_of(self.lm_head, rms_norm(h[:, 0], module.shared_head.norm)).argmax(-1, keepdim=True)]
        for j in range(w, w + n_draft - 1):
            h = module.static_step(h, embed(drafts[-1]), rope[:, j:j + 1], mtp_mask[:, :, j:j + 1], storage,
                                   mtp_slots[:, j:j + 1])
            drafts.append(linear_of(self.lm_head, rms_norm(h[:, 0], module.shared_head.norm)).argmax(-1, keepdim=True))
        drafted = torch.cat(drafts, dim=1)  # [1,K]
        hidden = self._static_main(torch.cat([bonus_ids, drafted], dim=1), positions, slots, hidden_mask, k)
        return drafted, linear_of(self.lm_head, hidden), hidden

    @torch.no_grad()
    def mtp_step(self, depth: int, h_prev: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache: KVCache, last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (0-based) on its own one-layer cache: h_prev [B,L,D] (h^depth), token_ids [B,L]
        (the tokens `depth + 1` ahead), attention_mask [B,L] -> (h^{depth+1} [B,L,D], logits of the last
        position [B,V], which predict the token `depth + 2` ahead of it). `last` [B], when given, picks
        another position per row for the logits (the last real one of a right-padded row)."""
        module = self.mtp[depth]
        slots, pos, mask = cache.prepare(attention_mask)
        cos, sin = self.model.rotary_emb(pos, h_prev.dtype)
        emb = self.model.embed_tokens(token_ids)
        stepped = step_applies(cache, h_prev.shape[1])
        if stepped:
            rope = rope_matrix(cos, sin, self.config.rope_interleave, self.config.qk_rope_head_dim)
            h = module.step(h_prev, emb, rope, ~mask, cache, slots)
        else:  # e.g. a per-head cache or a long chunk: the module's forward
            h = module(h_prev, emb, cos, sin, mask, cache, slots, attention_mask)
        cache.commit()
        h_last = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        normed = rms_norm(h_last, module.shared_head.norm) if stepped else module.head_norm(h_last)
        return h, linear_of(self.lm_head, normed)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def quantize_placeholders_(self, quantization_config: dict) -> None:
        """Swap the quantized modules for empty placeholders (nn/quant.py) that a quantized checkpoint fills."""
        from ..nn.quant import quantize_modules_

        quantize_modules_(self, quantization_config, empty=True)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Decode like `transformers`' generate(): returns the prompt ids followed by the new ids.

        See `seekformer.inference.generate` for the options (greedy, sampling, beams, stops, speculative).
        """
        from ..inference.generate import generate  # the decoding engine lives above the model

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> SeekForCausalLM:
        """Load a model directory (seekformer's or a `transformers` DeepseekV3/V2 one; sharded or not)."""
        from ..checkpoint import load_model

        return load_model(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "2GB",
                        dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face model directory (config.json, safetensors, generation_config.json) atomically."""
        from ..checkpoint import save_model

        save_model(self, path, max_shard_size=max_shard_size, dtype=dtype)


def step_applies(cache: KVCache, t: int) -> bool:
    """Whether a chunk of t tokens decodes through the `step` methods: latent cache, short chunk, no gradients."""
    return cache.mode == "latent" and t <= ABSORB_MAX_CHUNK and not torch.is_grad_enabled()


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, i] predicts labels[:, i+1]; -100 labels are ignored."""
    b, t, v = logits.shape
    # shift the labels, not the logits: no copy of the [B,T,V] tensor; the last position has no target
    target = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)
    return cross_entropy(logits.reshape(b * t, v), target.reshape(-1), ignore_index=-100)


__all__ = ["SeekForCausalLM", "SeekModel", "MTPModule", "CausalLMOutput", "Experts", "shifted_cross_entropy",
           "causal_mask", "positions_from_mask"]
