"""Self-speculative greedy decoding with the model's own Multi-Token Prediction modules.

Notation: t_j tokens, h^0_j the main model's final-normed hidden state at position j, h^k_j MTP depth k's
output; depth k at position j reads h^{k-1}_j and Emb(t_{j+k}) and predicts t_{j+k+1}.

One step, for a row whose confirmed tokens are t_0..t_n (t_n, the "bonus" token, not yet fed to the
main model):
  1. draft: depth k = 1..K runs on the positions it has not cached yet, up to n-1; its output at n-1
     predicts the draft d_{n+k}. Positions j > n-k read a draft token, so their cache entries are
     provisional and rolled back after drafting (recomputed next step from confirmed tokens).
  2. verify: the main model runs once on [t_n, d_{n+1}, .., d_{n+K}] (K+1 tokens, absorbed attention);
     its greedy choices g_0..g_K accept the longest prefix of drafts with d_{n+i+1} == g_i, then append
     g_a (the next bonus). Rejected main-cache slots are rolled back.
Every emitted token is the main model's greedy choice given the confirmed prefix, so the output equals
plain greedy decoding; each main forward yields 1 + a tokens (a = accepted drafts).

Each depth has its own one-layer KVCache (first_layer = num_hidden_layers + k - 1): a depth's cache
trails the main model's by the positions whose next tokens were not known yet.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..errors import GenerationError
from ..nn.few_rows import linear_of
from ..nn.kv_cache import KVCache
from ..nn.mla_decode import rms_norm, rope_matrix
from .runner import decode_forward, few_tokens, layer_step, lean_ok
from .sampling import SamplingParams
from .stopping import SequenceState, stop_ids


def _argmax(logits: torch.Tensor, states: list[SequenceState], offset: int = 0) -> torch.Tensor:
    """Greedy choice of logits [B,V] or [B,L,V]; stop ids are banned at generated positions < min_new_tokens."""
    if any(len(s.tokens) + offset < s.params.min_new_tokens for s in states):
        logits = logits.clone()
        for r, s in enumerate(states):
            ids = list(s.eos_ids)
            if logits.dim() == 2:
                if len(s.tokens) + offset < s.params.min_new_tokens:
                    logits[r, ids] = float("-inf")
            else:
                n = max(0, min(logits.shape[1], s.params.min_new_tokens - len(s.tokens) - offset))
                logits[r, :n, ids] = float("-inf")
    return logits.argmax(dim=-1)


def speculative_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                       tokenizer=None, cache_mode: str = "latent",
                       num_speculative_tokens: int | None = None) -> tuple[list[SequenceState], dict]:
    """Greedy decoding of input_ids [B,T] accelerated by MTP drafts; returns (states, stats).

    stats: proposed / accepted drafts, acceptance_rate, main_forwards, tokens_per_forward, seconds.
    """
    from .generate import new_cache

    cfg = model.config
    depth = len(model.mtp)
    if depth == 0:
        raise GenerationError("speculative decoding needs MTP modules: the model has num_nextn_predict_layers = 0")
    k_max = depth if num_speculative_tokens is None else int(num_speculative_tokens)
    if not 1 <= k_max <= depth:
        raise GenerationError(f"num_speculative_tokens must be in [1, {depth}] (the MTP depth), got {k_max}")
    if not params.greedy or params.penalised:
        raise GenerationError("speculative decoding is greedy only: drop sampling options and penalties")
    t0 = time.perf_counter()
    b, t = input_ids.shape
    dev, n_max = input_ids.device, params.max_new_tokens
    eos = stop_ids(params, cfg.eos_token_id)
    states = [SequenceState(params, eos, tokenizer) for _ in range(b)]
    main = new_cache(model, b, t + n_max + k_max + 1, cache_mode)
    cap = t + (2 * k_max + 1) * (n_max + 1)  # chunks are left-padded per depth: pad slots accumulate
    mtp_caches = [KVCache(cfg, b, cap, mode=cache_mode, dtype=model.dtype, device=dev, num_layers=1,
                          first_layer=cfg.num_hidden_layers + k) for k in range(k_max)]
    out = model(input_ids, attention_mask, cache=main, return_hidden=True, logits_to_keep=1)
    toks = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    # hid[k][r]: {position: final h^k} not yet consumed by depth k+1
    hid: list[list[dict[int, torch.Tensor]]] = [[{} for _ in range(b)] for _ in range(k_max)]
    for r in range(b):
        pad = t - len(toks[r])
        hid[0][r] = {j: out.hidden_states[r, pad + j] for j in range(len(toks[r]))}
    bonus = _argmax(out.logits[:, -1], states).tolist()
    for r in range(b):
        toks[r].append(bonus[r])
        states[r].append(bonus[r])
    rows = list(range(b))  # batch position -> original row
    proposed = accepted = forwards = 0
    while True:
        keep = [i for i, r in enumerate(rows) if not states[r].finished]
        if not keep:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=dev)
            for c in [main] + mtp_caches:
                c.reorder(idx)
            toks, hid = [toks[i] for i in keep], [[h[i] for i in keep] for h in hid]
            rows = [rows[i] for i in keep]
        run = [states[r] for r in rows]
        drafts = _draft(model, mtp_caches, toks, hid, k_max)
        chunk = torch.tensor([[tk[-1]] + d for tk, d in zip(toks, drafts)], device=dev)
        logits, hidden = decode_forward(model, chunk, main, last_only=False, return_hidden=True)
        forwards += 1
        g = _argmax(logits, run).tolist()  # [B', K+1]
        rollback = []
        for i, r in enumerate(rows):
            a = 0
            while a < k_max and drafts[i][a] == g[i][a]:
                a += 1
            proposed += k_max
            accepted += a
            rollback.append(k_max - a)
            n = len(toks[i]) - 1
            for j in range(a + 1):
                hid[0][i][n + j] = hidden[i, j]
            for tok in drafts[i][:a] + [g[i][a]]:
                if not states[r].finished:
                    states[r].append(tok)
                    toks[i].append(tok)
        main.rollback(torch.tensor(rollback, device=dev))
    generated = sum(len(s.tokens) for s in states)
    stats = {"proposed": proposed, "accepted": accepted, "acceptance_rate": accepted / max(proposed, 1),
             "main_forwards": forwards + 1, "tokens_per_forward": generated / (forwards + 1),
             "seconds": time.perf_counter() - t0, "new_tokens": generated}
    return states, stats


def _draft(model, caches: list[KVCache], toks: list[list[int]], hid: list[list[dict]], k_max: int) -> list[list[int]]:
    """Run MTP depths 1..K (see module doc); returns K draft tokens per row and updates caches and `hid`."""
    b = len(toks)
    dev = model.device
    drafts: list[list[int]] = [[] for _ in range(b)]
    prev: list[dict[int, torch.Tensor]] = [{} for _ in range(b)]  # this step's h^{k-1} by position
    for k in range(1, k_max + 1):
        cache, module = caches[k - 1], model.mtp[k - 1]
        start = cache.next_position.tolist()
        ns = [len(tk) - 1 for tk in toks]
        spans = [list(range(start[r], ns[r])) for r in range(b)]
        width = max(1, max(len(s) for s in spans))
        h_in = torch.zeros(b, width, cfg_hidden(model), dtype=model.dtype, device=dev)
        e_ids = torch.zeros(b, width, dtype=torch.long, device=dev)
        am = torch.zeros(b, width, dtype=torch.long, device=dev)
        for r in range(b):
            ext, off = toks[r] + drafts[r], width - len(spans[r])
            if spans[r]:
                h_in[r, off:] = torch.stack([prev[r][j] if j in prev[r] else hid[k - 1][r][j] for j in spans[r]])
                e_ids[r, off:] = torch.tensor([ext[j + k] for j in spans[r]], device=dev)
                am[r, off:] = 1
        h = _mtp_step(model, module, h_in, e_ids, am, cache)
        d = linear_of(model.lm_head, rms_norm(h[:, -1], module.shared_head.norm)).argmax(dim=-1).tolist()
        cache.rollback(torch.tensor([min(k - 1, len(s)) for s in spans], device=dev))  # provisional entries
        new_prev = []
        for r in range(b):
            drafts[r].append(d[r])
            off = width - len(spans[r])
            out_r = {j: h[r, off + i] for i, j in enumerate(spans[r])}
            new_prev.append(out_r)
            if k < k_max:  # final outputs (j <= n-k) wait for depth k+1
                hid[k][r].update({j: v for j, v in out_r.items() if j <= ns[r] - k})
            c_new = int(cache.next_position[r])
            hid[k - 1][r] = {j: v for j, v in hid[k - 1][r].items() if j >= c_new}
        prev = new_prev
    return drafts


def cfg_hidden(model) -> int:
    return model.config.hidden_size


def _mtp_step(model, module, h_prev: torch.Tensor, token_ids: torch.Tensor, am: torch.Tensor, cache: KVCache):
    """MTPModule.forward on its own cache: h_prev [B,L,D], token_ids [B,L] (t_{j+k}), am [B,L] -> h^k [B,L,D]."""
    slots, pos, mask = cache.prepare(am)
    cos, sin = model.model.rotary_emb(pos, h_prev.dtype)
    emb = model.model.embed_tokens(token_ids)
    if not lean_ok(cache, h_prev.shape[1]):  # e.g. the prompt: the module's own forward
        h = module(h_prev, emb, cos, sin, mask, cache, slots, am)
    else:
        x = linear_of(module.eh_proj, torch.cat([rms_norm(emb, module.enorm), rms_norm(h_prev, module.hnorm)],
                                                dim=-1))
        rope = rope_matrix(cos, sin, model.config.rope_interleave, model.config.qk_rope_head_dim)
        h = layer_step(module.block, x, rope, ~mask, cache, slots, few_tokens(model.config, am.numel()))
    cache.commit()
    return h
