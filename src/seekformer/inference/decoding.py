"""The one decode loop's state, and the helpers every decoder shares (generate, engine, beam, speculative).

Shapes: B rows (sequences), T prompt tokens, V vocabulary.

`DecodeBatch` is the per-step state of a batch of sequences being decoded over one KV cache: rows[i]
lives in cache row i (rows 0..n-1 are always the running ones), with its `SequenceState` (tokens, text,
stop conditions), sampling params, generator and penalty statistics. A decode loop is

    lo, hi = batch.admit(rows, prompts)                           # reserve rows, reset their state
    logits = batch.prefill(lo, hi, ids, mask)                     # the prompts into the cache: [k,V]
    while batch.rows:
        tokens, pieces = batch.choose(logits, lo, hi)             # sample, record, stop checks
        batch.retire()                                            # finished rows leave the batch
        logits, lo, hi = batch.decode(), 0, len(batch.rows)       # one model.decode_step for all rows

`generate.decode_steps` drives exactly this; `Engine` adds admission of waiting requests between steps
and cancellation (`remove`). With a `drafter` (speculative.MTPDrafter), `batch.speculate(wants)` replaces
`choose` + `decode`: MTP drafts verified in one forward of K+1 tokens per row, 1 to K+1 tokens per row
and step (greedy rows that want it; the others take one token by `choose`). Beam search keeps its own
loop (beams reorder rows) and shares the helpers below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .. import runtime
from ..errors import GenerationError
from ..nn.kv_cache import CACHE_MODES, KVCache
from .compiled import compiled_speculation, compiled_step
from .sampling import PenaltyState, choose, speculative_sample, truncate
from .stopping import SequenceState, early_stop_mask

BACKLOG = 64  # see DecodeBatch.decode: plain steps with a drafter catch it up past this many positions


def greedy_choices(logits: torch.Tensor, states: Sequence[SequenceState]) -> torch.Tensor:
    """`choose`'s greedy rule for rows without penalties or constraints, over L tokens ahead: logits [B,L,V]
    -> tokens [B,L] (stop ids masked by the min_new_tokens rule at each step)."""
    mask = early_stop_mask(states, logits.shape[-1], logits.device, logits.shape[1])
    logits = logits.float()
    return (logits if mask is None else logits.masked_fill(mask, float("-inf"))).argmax(dim=-1)


def drafts_apply(params) -> bool:
    """Whether speculative drafts can serve a row with these SamplingParams: no penalties, no constraint
    (greedy rows accept matching drafts, sampled rows by `speculative_sample`; any other row takes one
    token per step through `choose`)."""
    return not params.penalised and params.constraint is None


# ---------------------------------------------------------------------- shared helpers
def pad_id(config) -> int:
    """The id that pads prompts and finished rows: the config's pad id, else eos, else 0."""
    for i in (config.pad_token_id, config.eos_token_id, 0):
        if i is not None:
            return int(i)
    return 0


def prepare_inputs(model, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a tensor [B,T] or [T], a list of ids, or a list of id lists (left-padded here).

    Returns (input_ids [B,T], attention_mask [B,T]) on the model's device. Raises GenerationError for
    empty prompts and ids outside the vocabulary.
    """
    device = model.device
    pad = pad_id(model.config)
    if not torch.is_tensor(input_ids):
        rows = [list(input_ids)] if input_ids and isinstance(list(input_ids)[0], int) else [list(r) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise GenerationError("empty prompt: give at least one token")
        t = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows], dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise GenerationError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                              f"{tuple(input_ids.shape)}")
    if bool((attention_mask.sum(1) == 0).any()):
        raise GenerationError("empty prompt: a row of attention_mask has no tokens")
    real = input_ids[attention_mask.bool()]
    v = model.config.vocab_size
    if bool(((real < 0) | (real >= v)).any()):
        raise GenerationError(f"prompt token ids must be in [0, {v})")
    return input_ids.to(device), attention_mask.to(device)


def check_context(model, attention_mask: torch.Tensor, max_new_tokens: int, extra: int = 0) -> None:
    """Raise GenerationError if the longest prompt plus `max_new_tokens` exceeds the model context."""
    ctx = model.config.max_position_embeddings
    longest = int(attention_mask.sum(1).max())
    if longest >= ctx:
        raise GenerationError(f"prompt is {longest} tokens but the model context is {ctx}: shorten the prompt")
    if longest + max_new_tokens + extra > ctx:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model "
                              f"context ({ctx}): lower max_new_tokens to {ctx - longest - extra} or shorten the prompt")


def new_cache(model, batch_size: int, max_length: int, mode: str = "latent", mtp: bool = False) -> KVCache:
    """A cache for the main layers (and the MTP layers when `mtp`), in the model's dtype and device."""
    if mode not in CACHE_MODES:
        raise GenerationError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    cfg = model.config
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return KVCache(cfg, batch_size, max_length, mode=mode, dtype=model.dtype, device=model.device, num_layers=layers)


def _scratch_step(model):
    """A batch-1 decoding step on a scratch cache (prefilled with 32 tokens), undone after each call: what
    the automatic choices below time."""
    cache = new_cache(model, 1, 40)
    ids = torch.arange(3, 35, device=model.device)[None] % model.config.vocab_size
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)

    def one_step():
        with torch.no_grad():
            model.decode_step(ids[:, :1], cache)
        cache.rollback(1)

    return one_step


def step_threads(model, tokens: int) -> int | None:
    """Threads for a decoding step of `tokens` tokens in all (runtime.decode_threads): None = leave torch's
    setting; with "auto", steps of at most runtime.FEW_ROW_TOKENS tokens use the count measured once per
    model and thread budget (a batch-1 step on a scratch cache, 1 thread vs torch's count)."""
    policy = runtime.decode_threads()
    if policy is None or tokens > runtime.FEW_ROW_TOKENS:
        return None
    if isinstance(policy, int):
        return policy
    budget = torch.get_num_threads()
    chosen = model.__dict__.setdefault("_decode_threads", {})
    if budget not in chosen:
        chosen[budget] = runtime.fastest_threads(_scratch_step(model), [1, budget])
    return chosen[budget]


def _products(model, flag: bool | None):
    """The model's context manager for the product form of its decoding steps (`decode_products`; models
    without one: nothing changes)."""
    form = getattr(model, "decode_products", None)
    return form(flag) if form is not None else contextlib.nullcontext()


def product_form(model) -> bool | None:
    """Whether decoding steps use the model's few-row product form (`SeekForCausalLM.decode_products`;
    runtime.product_form_policy): None = leave it as is (on); with "auto", the faster of both on this model's
    batch-1 step, measured once per model and thread count (interleaved, median of 7; the choice and the
    timings are kept in `model.__dict__["_decode_products"]`)."""
    policy = runtime.product_form_policy()
    if policy != "auto" or getattr(model, "decode_products", None) is None:
        return None if policy == "auto" else policy
    threads = torch.get_num_threads()
    chosen = model.__dict__.setdefault("_decode_products", {})
    if threads not in chosen:
        flag, med = runtime.fastest({True: lambda: _products(model, True), False: lambda: _products(model, False)},
                                    _scratch_step(model))
        chosen[threads] = {"few_row_form": flag, "seconds": med}
    return chosen[threads]["few_row_form"]


class step_settings:
    """Context manager around a decoding step of `tokens` tokens: the thread count (`step_threads`) and the
    product form (`product_form`) chosen for this model."""

    def __init__(self, model, tokens: int) -> None:
        self.model, self.tokens = model, tokens
        self.threads = self.form = None

    def __enter__(self) -> None:
        self.threads = runtime.torch_threads(step_threads(self.model, self.tokens))
        self.threads.__enter__()
        self.form = _products(self.model, product_form(self.model))
        self.form.__enter__()

    def __exit__(self, *exc) -> None:
        self.form.__exit__(*exc)
        self.threads.__exit__(*exc)


# ---------------------------------------------------------------------- the decode loop's state
class Row:
    """One sequence of a DecodeBatch: its `state` (SequenceState), random `generator` and a caller's `key`."""

    __slots__ = ("state", "generator", "key")

    def __init__(self, state: SequenceState, generator: torch.Generator | None = None, key=None) -> None:
        self.state, self.generator, self.key = state, generator, key


class DecodeBatch:
    """Rows decoded together over `cache` (see the module docstring); rows[i] lives in cache row i.

    `rows` may hold any objects with `.state` (SequenceState) and `.generator` attributes (the engine's
    requests). `generator`, when given, is one generator shared by the whole batch (generate's `seed`);
    otherwise each row draws from its own. `penalties` tracks every cache row (None: no penalties).
    """

    def __init__(self, model, cache: KVCache, penalties: PenaltyState | None = None,
                 generator: torch.Generator | None = None, drafter=None, compile: bool | None = None) -> None:
        self.model = model
        self.compile = compile  # plain steps through the compiled graph (inference/compiled.py); None: process default
        self.cache = cache
        self.drafter = drafter  # speculative.MTPDrafter or None; follows the rows (prompts, moves, hidden states)
        # which rows the drafter tracks (the engine: requests that speculate); None = every row
        self.drafts_for = None
        self.spec_stats = {"proposed": 0, "accepted": 0, "forwards": 0}
        self.vocab = model.config.vocab_size
        self.penalties = penalties or PenaltyState.create([[]] * cache.batch_size, self.vocab, model.device,
                                                          active=False)
        self.generator = generator
        self.rows: list = []

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, rows: Sequence, prompts: Sequence[Sequence[int]] | None = None) -> tuple[int, int]:
        """Append `rows` in the free cache rows [lo, hi) (emptied; penalties see `prompts`); returns (lo, hi)."""
        lo, hi = len(self.rows), len(self.rows) + len(rows)
        if hi > self.cache.batch_size:
            raise GenerationError(f"a decode batch of {self.cache.batch_size} rows cannot take {hi}")
        self.reset_rows(list(range(lo, hi)))
        for i, row in enumerate(range(lo, hi)):
            self.penalties.reset_row(row, prompts[i] if prompts is not None else [])
        self.rows.extend(rows)
        return lo, hi

    def prefill(self, lo: int, hi: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode (a chunk of) the prompts of rows [lo, hi): input_ids/attention_mask [hi-lo, T] (left
        padded) -> logits of their last positions [hi-lo, V]."""
        cache = self.cache if (lo, hi) == (0, self.cache.batch_size) else self.cache.rows(lo, hi)
        out = self.model(input_ids, attention_mask, cache=cache, logits_to_keep=1, return_hidden=self.drafter is not None)
        if self.drafter is not None:
            for i, (ids, m) in enumerate(zip(input_ids, attention_mask.bool())):
                if self.tracked(self.rows[lo + i]):
                    self.drafter.add_prompt(lo + i, ids[m].tolist(), out.hidden_states[i][m])
        return out.logits[:, -1]

    def reset_rows(self, rows: list[int]) -> None:
        """Empty cache rows `rows` (and the drafter's)."""
        self.cache.reset_rows(rows)
        if self.drafter is not None:
            self.drafter.reset_rows(rows)

    def move_row(self, src: int, dst: int) -> None:
        """Copy cache row `src` into `dst` (and the drafter's); `src` is left as is."""
        self.cache.move_row(src, dst)
        if self.drafter is not None:
            self.drafter.move_row(src, dst)

    def tracked(self, row) -> bool:
        """Whether the drafter keeps state for `row` (`drafts_for`; every row by default)."""
        return self.drafts_for is None or bool(self.drafts_for(row))

    def _tokens(self, i: int) -> list[int] | None:
        """Row i's confirmed tokens (prompt + generated) as the drafter sees them; None for an untracked row."""
        row = self.rows[i]
        return self.drafter.prefix[i] + row.state.tokens if self.tracked(row) else None

    def decode(self) -> torch.Tensor:
        """One decoding step of every row on its last token: -> logits [n,V] (`model.decode_step`)."""
        n = len(self.rows)
        last = torch.tensor([[r.state.tokens[-1]] for r in self.rows], device=self.model.device)
        cache = self.cache if n == self.cache.batch_size else self.cache.rows(0, n)
        step = compiled_step(self.model, self.compile)
        want_hidden = self.drafter is not None
        with step_settings(self.model, n):
            out = step(last, cache, want_hidden) if step is not None else None
            if out is None:
                out = self.model.decode_step(last, cache, return_hidden=want_hidden)
        if not want_hidden:
            return out
        logits, hidden = out
        for i in range(n):
            if self.tracked(self.rows[i]):
                self.drafter.add_hidden(i, hidden[i])
        if self.drafter.backlog(n) > BACKLOG:  # no row drafted for a while: catch up (bounds the memory)
            self.drafter.draft([self._tokens(i) for i in range(n)])
        return logits

    def speculate(self, wants: Sequence[bool], isolate: bool = False):
        """One speculative step of every row (needs a drafter): K drafts per row, verified by one
        `model.decode_step` of K+1 tokens (a single row with compiling on: drafts and verification in one
        compiled graph, `MTPDrafter.fused`); a greedy row with `wants[i]` whose params allow drafts
        (`drafts_apply`) takes the longest prefix of drafts equal to the greedy choices plus the next greedy
        token (exactly what plain greedy decoding emits), a sampled one the tokens of `speculative_sample`
        (the same distribution as plain sampling, not the same draws), any other row one token by `choose`.

        Returns (tokens, pieces, logits, errors): per row the emitted tokens and text pieces (rows may
        finish on any of them), logits [n,K+1,V] (the j-th token of row i was chosen from logits[i, j]), and
        {row: exception} for rows that failed (with `isolate`; they are marked finished with "error").
        """
        n, d = len(self.rows), self.drafter
        k = d.k
        cache = self.cache if n == self.cache.batch_size else self.cache.rows(0, n)
        graph = compiled_speculation(self.model, self.compile) if n == 1 and cache.mode == "latent" else None
        with step_settings(self.model, n * (k + 1)):
            fused = d.fused(self._tokens(0), cache, graph) if graph is not None and not torch.is_grad_enabled() else None
            if fused is not None:  # drafts and verification in one compiled graph
                drafts, logits, hidden = [fused[0]], fused[1], fused[2]
            else:
                drafts = d.draft([self._tokens(i) for i in range(n)])
                chunk = torch.tensor([[r.state.tokens[-1]] + dr for r, dr in zip(self.rows, drafts)],
                                     device=self.model.device)
                logits, hidden = self.model.decode_step(chunk, cache, last_only=False, return_hidden=True)
        self.spec_stats["forwards"] += 1
        spec = [bool(w) and drafts_apply(r.state.params) for w, r in zip(wants, self.rows)]
        idx = [i for i in range(n) if spec[i] and self.rows[i].state.params.greedy]
        greedy = greedy_choices(logits[idx], [self.rows[i].state for i in idx]).tolist() if idx else []
        accepted = {}  # row -> tokens it emits: accepted drafts, then one more
        for g, i in zip(greedy, idx):
            a = 0
            while a < k and drafts[i][a] == g[a]:
                a += 1
            accepted[i] = drafts[i][:a] + [g[a]]
        for i in range(n):
            if spec[i] and i not in accepted:  # sampled: speculative sampling on the processed distributions
                st = self.rows[i].state
                lg = logits[i].float()
                banned = early_stop_mask([st], lg.shape[-1], lg.device, k + 1)
                lg = lg if banned is None else lg.masked_fill(banned[0], float("-inf"))
                probs = truncate(lg, [st.params] * (k + 1)).softmax(dim=-1)
                gen = self.generator if self.generator is not None else self.rows[i].generator
                accepted[i] = speculative_sample(probs, drafts[i], gen)
        tokens: list[list[int]] = [[] for _ in range(n)]
        pieces: list[list[str]] = [[] for _ in range(n)]
        errors: dict[int, Exception] = {}
        for i in range(n):
            if not spec[i]:
                out = self.choose(logits[i:i + 1, 0], i, i + 1, isolate=isolate)
                tokens[i], pieces[i] = out[0].tolist(), out[1]
                if isolate and out[2]:
                    errors[i], tokens[i], pieces[i] = out[2][0], [], []
        for i, emit in accepted.items():
            self.spec_stats["proposed"] += k
            self.spec_stats["accepted"] += len(emit) - 1
            st = self.rows[i].state
            for t in emit:
                if st.finished:
                    break
                try:
                    pieces[i].append(st.append(t))
                except Exception as e:  # noqa: BLE001 - e.g. a failing stop-string filter: this row only
                    if not isolate:
                        raise
                    errors[i] = e
                    st.finish_reason = st.finish_reason or "error"
                    break
                tokens[i].append(t)
            if self.penalties.active and tokens[i]:
                one = PenaltyState(self.penalties.seen[i:i + 1], self.penalties.counts[i:i + 1], True)
                for t in tokens[i]:
                    one.update(torch.tensor([t], device=logits.device))
        self.cache.rows(0, n).rollback([k + 1 - max(len(t), 1) for t in tokens])
        for i in range(n):
            if self.tracked(self.rows[i]):
                d.add_hidden(i, hidden[i, :max(len(tokens[i]), 1)])
        return tokens, pieces, logits, errors

    def choose(self, logits: torch.Tensor, lo: int = 0, hi: int | None = None, isolate: bool = False):
        """Pick the next token of rows [lo, hi) from logits [hi-lo, V] and record it in their states.

        Stop ids are masked before `min_new_tokens` (`stopping.early_stop_mask`); per-request logits rules
        that need the tokens so far (e.g. a constraint in SamplingParams) get them from `states` here.
        Returns (tokens [hi-lo], text pieces); a row that finishes stays until `retire`. With `isolate`
        (the engine), a row whose sampling or stop handling raises does not fail the others: returns
        (tokens, pieces, {row offset: exception}) and marks that row finished with reason "error".
        """
        hi = len(self.rows) if hi is None else hi
        rows = self.rows[lo:hi]
        states = [r.state for r in rows]
        pen = PenaltyState(self.penalties.seen[lo:hi], self.penalties.counts[lo:hi], self.penalties.active)
        gens = self.generator if self.generator is not None else [r.generator for r in rows]
        banned = early_stop_mask(states, logits.shape[-1], logits.device)
        if not isolate:
            tok = choose(logits, [s.params for s in states], pen, gens, banned)
            pen.update(tok)
            return tok, [s.append(t) for s, t in zip(states, tok.tolist())]
        errors: dict[int, Exception] = {}
        try:
            tok = choose(logits, [s.params for s in states], pen, gens, banned)
        except Exception:  # noqa: BLE001 - find the row(s) at fault, row by row
            tok = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
            for j, st in enumerate(states):
                one = PenaltyState(pen.seen[j:j + 1], pen.counts[j:j + 1], pen.active)
                g = [gens[j]] if isinstance(gens, list) else gens
                try:
                    tok[j] = choose(logits[j:j + 1], [st.params], one, g,
                                    None if banned is None else banned[j:j + 1])[0]
                except Exception as e:  # noqa: BLE001
                    errors[j] = e
        pen.update(tok)
        pieces = []
        for j, (st, t) in enumerate(zip(states, tok.tolist())):
            piece = ""
            if j not in errors:
                try:
                    piece = st.append(t)
                except Exception as e:  # noqa: BLE001 - e.g. a failing stop-string filter
                    errors[j] = e
            if j in errors and st.finish_reason is None:
                st.finish_reason = "error"
            pieces.append(piece)
        return tok, pieces, errors

    def remove(self, i: int) -> None:
        """Take row i out: the last row moves into its cache row, so rows stay 0..n-1."""
        last = len(self.rows) - 1
        if i != last:
            self.move_row(last, i)
            self.penalties.seen[i] = self.penalties.seen[last]
            self.penalties.counts[i] = self.penalties.counts[last]
            self.rows[i] = self.rows[last]
        self.reset_rows([last])
        self.rows.pop()

    def retire(self) -> list:
        """Remove the finished rows; returns them."""
        done = []
        for i in reversed(range(len(self.rows))):
            if self.rows[i].state.finished:
                done.append(self.rows[i])
                self.remove(i)
        return done
