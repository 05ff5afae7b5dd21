"""Self-speculative decoding with the model's own Multi-Token Prediction modules (greedy rows).

Notation: t_j tokens, h^0_j the main model's final-normed hidden state at position j, h^k_j MTP depth k's
output; depth k at position j reads h^{k-1}_j and Emb(t_{j+k}) and predicts t_{j+k+1}.

One step, for a row whose confirmed tokens are t_0..t_n (t_n, the "bonus" token, not yet fed to the
main model):
  1. draft (`MTPDrafter.draft`): depth k = 1..K runs on the positions it has not cached yet, up to n-1;
     its output at n-1 predicts the draft d_{n+k}. Positions j > n-k read a draft token, so their cache
     entries are provisional and rolled back after drafting (recomputed next step from confirmed tokens).
     For depth 1 every position is confirmed: drafting is the catch-up of the positions the last step
     confirmed (1 + accepted drafts), so its cost is one MTP layer on a token or two.
  2. verify (`DecodeBatch.speculate`): the main model runs once on [t_n, d_{n+1}, .., d_{n+K}] (K+1
     tokens, absorbed attention: about the cost of one step, the weights are read once); its greedy
     choices g_0..g_K accept the longest prefix of drafts with d_{n+i+1} == g_i, then append g_a (the next
     bonus). Rejected main-cache slots are rolled back.
Every emitted token is the main model's greedy choice given the confirmed prefix, so the output equals
plain greedy decoding; each main forward yields 1 + a tokens (a = accepted drafts).

Rows of a batch have different spans: inputs are right-padded, and the padding slots (at the end of a
row) are rolled back with the provisional ones, so a depth's cache holds exactly the confirmed positions
and never fills with padding. A long span (a new prompt) is first caught up alone, so short rows are not
padded to its length. Each depth has its own one-layer KVCache (first_layer = num_hidden_layers + k - 1):
a depth's cache trails the main model's by the positions whose next tokens were not known yet.

`MTPDrafter` keeps that per-row state for a `DecodeBatch` (rows 0..n-1 of its caches, moved and reset
with the batch's rows): the generate path (`speculative_decode`) and the serving engine share it.
"""

from __future__ import annotations

import time

import torch

from ..errors import GenerationError
from ..nn.kv_cache import KVCache
from .decoding import DecodeBatch, Row, new_cache
from .sampling import SamplingParams
from .stopping import SequenceState, stop_ids

SHORT = 8  # a row with a longer span than this is caught up alone first (a new prompt)


MAX_DRAFTS = SHORT - 1  # drafts per step at most (the provisional positions of a run stay under SHORT)


def check_speculative(model, num_speculative_tokens: int | None) -> int:
    """The number of drafts per step (default: the MTP depth); GenerationError when the model cannot draft."""
    depth = len(model.mtp)
    if depth == 0:
        raise GenerationError("speculative decoding needs MTP modules: the model has num_nextn_predict_layers = 0")
    k = depth if num_speculative_tokens is None else int(num_speculative_tokens)
    if not 1 <= k <= MAX_DRAFTS:
        raise GenerationError(f"num_speculative_tokens must be in [1, {MAX_DRAFTS}] (beyond the MTP depth {depth}, "
                              f"the last MTP module drafts again from its own output), got {k}")
    return k


class MTPDrafter:
    """Draft tokens for the rows of a DecodeBatch from the model's MTP modules (see the module docstring).

    Per cache row r: `prefix[r]`, the prompt tokens (the generated ones are the row's state.tokens), and for
    each depth the confirmed inputs h^{k-1} it has not consumed yet (positions from its cache's
    next_position on). The batch feeds it the main model's hidden states (`add_hidden`) and mirrors its
    row moves (`move_row`, `reset_rows`).
    """

    def __init__(self, model, batch_size: int, max_length: int, num_tokens: int | None = None,
                 cache_mode: str = "latent") -> None:
        self.model = model
        self.k = check_speculative(model, num_tokens)
        self.depth = min(self.k, len(model.mtp))  # MTP modules used; drafts past them chain the last one
        cfg = model.config
        cap = max_length + 2 * SHORT + 1  # transient entries: right padding, provisional positions, chained drafts
        self.caches = [KVCache(cfg, batch_size, cap, mode=cache_mode, dtype=model.dtype, device=model.device,
                               num_layers=1, first_layer=cfg.num_hidden_layers + d) for d in range(self.depth)]
        self.prefix: list[list[int]] = [[] for _ in range(batch_size)]
        # pend[d][r]: chunks [m,D] of confirmed h^d for positions caches[d].next_position[r] onwards
        self.pend: list[list[list[torch.Tensor]]] = [[[] for _ in range(batch_size)] for _ in range(self.depth)]

    # ------------------------------------------------------------------ row bookkeeping (mirrors DecodeBatch)
    def reset_rows(self, rows: list[int]) -> None:
        for c in self.caches:
            c.reset_rows(rows)
        for r in rows:
            self.prefix[r] = []
            for p in self.pend:
                p[r] = []

    def move_row(self, src: int, dst: int) -> None:
        for c in self.caches:
            c.move_row(src, dst)
        self.prefix[dst] = self.prefix[src]
        for p in self.pend:
            p[dst] = list(p[src])

    def add_prompt(self, row: int, tokens: list[int], hidden_LD: torch.Tensor) -> None:
        """Prompt tokens of `row` (or a chunk of them) and their final hidden states [L,D]."""
        self.prefix[row] = self.prefix[row] + list(tokens)
        self.add_hidden(row, hidden_LD)

    def add_hidden(self, row: int, hidden_LD: torch.Tensor) -> None:
        """The main model's final hidden states [L,D] of the next L confirmed positions of `row`."""
        if hidden_LD.shape[0]:
            self.pend[0][row].append(hidden_LD)

    def backlog(self, n: int) -> int:
        """The most confirmed main-model positions any of rows 0..n-1 has not drafted from yet."""
        return max((sum(h.shape[0] for h in self.pend[0][r]) for r in range(n)), default=0)

    # ------------------------------------------------------------------ drafting
    def draft(self, toks: list[list[int]]) -> list[list[int]]:
        """Drafts for rows 0..n-1 whose confirmed tokens are toks[r] (prompt + generated, the last one not yet
        fed to the main model): -> K draft tokens per row. Updates the depth caches and pending states.
        A row whose toks[r] is None is not tracked (a request that does not speculate): it gets K
        meaningless drafts and its caches stay empty."""
        n = len(toks)
        drafts: list[list[int]] = [[] for _ in range(n)]
        prev: list[tuple[int, torch.Tensor] | None] = [None] * n  # this step's h^{k-1}: (first position, [L,D])
        for d in range(self.depth):
            long = [r for r in range(n) if toks[r] is not None
                    and len(toks[r]) - 1 - int(self.caches[d].next_position[r]) > SHORT]
            for r in long:  # confirmed positions only: SHORT > K - 1 provisional ones
                span = len(toks[r]) - 1 - int(self.caches[d].next_position[r]) - SHORT
                self._run(d, r, r + 1, toks, drafts, prev, [span], confirmed_only=True)
            last_depth = d == self.depth - 1
            prev, rollback = self._run(d, 0, n, toks, drafts, prev, None, confirmed_only=False,
                                       keep=last_depth and self.k > self.depth)
        if self.k > self.depth:
            self._chain(n, drafts, prev, rollback)
        return drafts

    def fused(self, toks: list[int] | None, cache: KVCache, graph) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """Drafting and verification of row 0 of a batch of one in one call of `graph` (the captured
        `SeekForCausalLM.static_speculate_step`, inference/compiled.py): toks as in `draft`, `cache` the main
        model's (row 0) -> (K drafts, logits [1,K+1,V], final-normed hidden [1,K+1,D]) of the verification
        forward on [toks[-1], drafts], with the caches as `draft` followed by `decode_step` of those K+1
        tokens leaves them (the caller rolls back the rejected main-cache slots and feeds the hidden states
        back with `add_hidden`). None, with nothing changed, when this state does not fit the graph (MTP
        depth > 1) or the graph failed.

        The catch-up positions are right-padded to K+1 (the graph's shapes do not depend on how many drafts
        the last step accepted); the padding and the K-1 chained positions are rolled back from the MTP cache.
        More than K+1 positions to catch up (right after a prompt): all but the last K+1 run eagerly first.
        """
        if self.depth != 1 or toks is None:
            return None
        mc = self.caches[0] if self.caches[0].batch_size == 1 else self.caches[0].rows(0, 1)
        p, n, w, k = int(mc.next_position[0]), len(toks) - 1, self.k + 1, self.k
        m = n - p  # confirmed positions depth 1 has not run on
        if m < 1 or sum(h.shape[0] for h in self.pend[0][0]) != m:
            return None
        if m > w:  # a prompt: the positions before the last K+1 through the module's eager step
            self._run(0, 0, 1, [toks], [[]], [None], [m - w], confirmed_only=True)
            p, m = p + m - w, w
        pend = self.pend[0][0]
        pad = w - m
        h_pend = torch.cat([*pend, pend[0].new_zeros(pad, pend[0].shape[-1])] if pad else pend)[None]  # [1,W,D]
        dev = h_pend.device
        next_ids = torch.tensor([toks[p + 1:n + 1] + [0] * pad], device=dev)  # [1,W]
        m_slots, m_pos, m_mask = mc.prepare(torch.tensor([[1] * m + [0] * pad + [1] * (k - 1)], device=dev))
        slots, pos, mask = cache.prepare(torch.ones(1, k + 1, dtype=torch.long, device=dev))
        out = graph(torch.tensor([[toks[-1]]], device=dev), h_pend, next_ids, torch.tensor([m - 1], device=dev),
                    m_pos, m_slots, ~m_mask, mc.k, pos, slots, ~mask, cache.k[:self.model.config.num_hidden_layers])
        if out is None:  # nothing committed
            mc._pending = mc._start = cache._pending = cache._start = None
            return None
        cache.commit()
        mc.commit()
        mc.rollback(pad + k - 1)
        self.pend[0][0] = []
        drafts, logits, hidden = out
        return drafts[0].tolist(), logits, hidden

    def _chain(self, n: int, drafts, prev, rollback: list[int]) -> None:
        """Drafts past the MTP depth (EAGLE-style): the last module runs again one position further, on its own
        output there and the draft it just made; these entries and the last run's provisional ones and padding
        (still in its cache, so positions and attention stay right) are rolled back at the end."""
        d = self.depth - 1
        cache = self.caches[d].rows(0, n) if n != self.caches[d].batch_size else self.caches[d]
        dev = self.model.device
        h = torch.stack([ph[-1] for _, ph in prev])[:, None]  # [n,1,D]
        ones = torch.ones(n, 1, dtype=torch.long, device=dev)
        for _ in range(self.k - self.depth):
            ids = torch.tensor([[dr[-1]] for dr in drafts], device=dev)
            h, logits = self.model.mtp_step(d, h, ids, ones, cache)
            for dr, t in zip(drafts, logits.argmax(dim=-1).tolist()):
                dr.append(t)
        cache.rollback([r + self.k - self.depth for r in rollback])

    def _run(self, d: int, lo: int, hi: int, toks, drafts, prev, spans, confirmed_only: bool, keep: bool = False):
        """Depth d+1 over rows [lo, hi): positions from its cache's next position, `spans[i]` of them (None:
        up to n-1, appending a draft per row). Returns this run's outputs per row (first position, [L,D]) and
        the slots per row to roll back (rolled back here unless `keep`)."""
        k = d + 1
        cache = self.caches[d].rows(lo, hi) if (lo, hi) != (0, self.caches[d].batch_size) else self.caches[d]
        start = cache.next_position.tolist()
        rows = range(lo, hi)
        ns = [len(toks[r]) - 1 if toks[r] is not None else start[i] for i, r in enumerate(rows)]
        lens = spans if spans is not None else [max(0, ns[i] - start[i]) for i in range(len(ns))]
        width = max(1, max(lens))
        dim, dev = self.model.config.hidden_size, self.model.device
        h_in = torch.zeros(len(ns), width, dim, dtype=self.model.dtype, device=dev)
        e_ids = torch.zeros(len(ns), width, dtype=torch.long, device=dev)
        am = torch.zeros(len(ns), width, dtype=torch.long, device=dev)
        have_by_row = []
        for i, r in enumerate(rows):
            pend = self.pend[d][r]
            have = pend[0] if len(pend) == 1 else (torch.cat(pend) if pend else h_in.new_zeros(0, dim))
            have_by_row.append(have)
            m = lens[i]
            if not m:
                continue
            h = have[:m]
            if h.shape[0] < m:  # the provisional tail: this step's outputs of the depth below
                p0, ph = prev[r]
                h = torch.cat([h, ph[start[i] + h.shape[0] - p0: start[i] + m - p0]])
            h_in[i, :m] = h
            ext = toks[r] + drafts[r]
            e_ids[i, :m] = torch.tensor(ext[start[i] + k: start[i] + k + m], device=dev)
            am[i, :m] = 1
        last = torch.tensor([max(m - 1, 0) for m in lens], device=dev)
        h_out, logits = self.model.mtp_step(d, h_in, e_ids, am, cache, last=last)
        if not confirmed_only:
            for i, t in enumerate(logits.argmax(dim=-1).tolist()):
                drafts[lo + i].append(t)
        out, rollback = [None] * len(prev), []
        for i, r in enumerate(rows):
            m = lens[i]
            conf = m if confirmed_only else max(0, min(m, ns[i] - k - start[i] + 1))  # positions j <= n-k
            rollback.append(width - conf)
            self.pend[d][r] = [have_by_row[i][conf:]] if have_by_row[i].shape[0] > conf else []
            if d + 1 < self.depth and conf:
                self.pend[d + 1][r].append(h_out[i, :conf])
            out[r] = (start[i], h_out[i, :max(m, 1)])
        if not keep:
            cache.rollback(rollback)
        return out, rollback


def speculative_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                       tokenizer=None, cache_mode: str = "latent",
                       num_speculative_tokens: int | None = None, compile: bool | None = None
                       ) -> tuple[list[SequenceState], dict]:
    """Greedy decoding of input_ids [B,T] accelerated by MTP drafts; returns (states, stats). `compile`: a
    single row drafts and verifies in one compiled graph per step (`MTPDrafter.fused`); None = the process
    default (`--compile`).

    stats: proposed / accepted drafts, acceptance_rate, main_forwards, tokens_per_forward, seconds.
    """
    k = check_speculative(model, num_speculative_tokens)
    if not params.greedy or params.penalised:
        raise GenerationError("speculative decoding is greedy only: drop sampling options and penalties")
    t0 = time.perf_counter()
    b, t = input_ids.shape
    n_max = params.max_new_tokens
    drafter = MTPDrafter(model, b, t + n_max, k, cache_mode)
    batch = DecodeBatch(model, new_cache(model, b, t + n_max + k, cache_mode), drafter=drafter, compile=compile)
    eos = stop_ids(params, model.config.eos_token_id)
    rows = [Row(SequenceState(params, eos, tokenizer)) for _ in range(b)]
    lo, hi = batch.admit(rows)
    batch.choose(batch.prefill(lo, hi, input_ids, attention_mask), lo, hi)
    batch.retire()
    forwards = 1
    while batch.rows:
        batch.speculate([True] * len(batch.rows))
        forwards += 1
        batch.retire()
    states = [r.state for r in rows]
    generated = sum(len(s.tokens) for s in states)
    proposed, accepted = batch.spec_stats["proposed"], batch.spec_stats["accepted"]
    stats = {"proposed": proposed, "accepted": accepted, "acceptance_rate": accepted / max(proposed, 1),
             "main_forwards": forwards, "tokens_per_forward": generated / forwards,
             "seconds": time.perf_counter() - t0, "new_tokens": generated}
    return states, stats
