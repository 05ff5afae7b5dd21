"""A continuous-batching decoding engine: requests join a running batch and leave it when done.

    engine = Engine(model, tokenizer, max_batch_size=8)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64, do_sample=True, seed=0))
    while engine.has_work():
        for ev in engine.step():          # TokenEvent per request that advanced (or ended)
            print(ev.request_id, ev.token_id, ev.text, ev.logprob, ev.finish_reason)

One preallocated latent KV cache holds `max_batch_size` rows of `max_length` slots. The running requests
always occupy rows 0..n-1 (a finished request's row is refilled by moving the last row into it), so a
decode step is one forward of n tokens over the row view [0, n). A `step()`:
  1. ends cancelled requests (event with finish_reason "cancelled"),
  2. decodes one token for every running request (batched, each row with its own sampling params,
     generator, penalties and stop conditions),
  3. admits waiting requests into free rows: prompts of similar lengths are prefilled together (left
     padded, one forward) and their first tokens chosen (so a new request yields its first event in the
     step that admits it). A prompt longer than `prefill_chunk` tokens is prefilled in chunks of that
     size, one chunk per step, in the last cache row (then moved next to the running rows), so running
     requests keep decoding while it is encoded (chunked prefill); prompt tokens prefilled per step are
     bounded by about `prefill_chunk`.
Finish reasons: "stop" (eos, a stop id or a stop string), "length" (max_new_tokens), "cancelled", "error".

Speculative decoding (a model with MTP modules): the engine keeps an `MTPDrafter` beside the cache, and a
step in which some running request wants speculation (`SamplingParams.speculative`, default the engine's
`speculative`) is one `DecodeBatch.speculate`: MTP drafts verified in one forward of K+1 tokens per row,
so a request (without penalties or a constraint) advances by 1 to K+1 tokens and yields that many events:
greedy ones exactly the tokens plain greedy decoding gives, sampled ones by speculative sampling (the same
distribution); the other rows advance by one token as usual. The drafter keeps state only for requests
that speculate.

Failure isolation: an exception while serving one request (its sampling setup, its stop strings, its
sampling) ends only that request, with an event whose finish_reason is "error" and `error` the exception;
a failing prefill forward ends the requests of that prefill, a failing decode forward the running ones.

Thread safety: `add_request` and `cancel` may be called from any thread (they only touch a locked
queue); `step()` must be driven by one thread (a second concurrent call blocks until the first returns).
The model must not be used elsewhere while `step()` runs.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import GenerationError
from .decoding import DecodeBatch, drafts_apply, new_cache, prepare_inputs
from .speculative import MTPDrafter, check_speculative
from .sampling import PenaltyState, SamplingParams, make_generator, token_logprobs
from .stopping import SequenceState, stop_ids

# Batched prefill (see Engine._take_prefill_batch): how much left padding a batch of prompts may carry.
PREFILL_PAD_FACTOR = 1.5
PREFILL_PAD_SLACK = 32
PREFILL_MAX_TOKENS = 4096
PREFILL_CHUNK = 512  # prompt tokens prefilled per step; longer prompts are prefilled in chunks of this size


@dataclass
class Request:
    """A generation request: id, prompt token ids and sampling parameters (incl. stop conditions)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    state: SequenceState | None = None
    generator: torch.Generator | None = None
    prefilled: int = 0  # prompt tokens already in the cache (chunked prefill)


@dataclass
class TokenEvent:
    """One new token of one request (token_id None for a request cancelled before its next token).

    `text` is the new text piece (complete UTF-8, stop strings removed; "" without a tokenizer),
    `logprob` the token's log-probability under the model (unprocessed logits) and `top_logprobs` the
    `params.logprobs` most likely alternatives as (token id, logprob), when requested.
    """

    request_id: str
    token_id: int | None
    text: str = ""
    index: int = 0  # position of the token among the request's generated tokens
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the request's last event
    error: Exception | None = None  # what ended the request, when finish_reason is "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]


class Engine:
    """Continuous batching over one preallocated KV cache (see the module docstring)."""

    def __init__(self, model, tokenizer=None, max_batch_size: int = 8, max_length: int | None = None,
                 cache_mode: str = "latent", prefill_chunk: int = PREFILL_CHUNK, speculative: bool | None = None,
                 num_speculative_tokens: int | None = None, compile: bool | None = None) -> None:
        """`speculative`: True = requests speculate unless they say otherwise (needs MTP modules); None =
        only requests that ask (`SamplingParams.speculative`), when the model has MTP modules; False = never.
        `num_speculative_tokens`: drafts per step (default the MTP depth). `compile`: plain decoding steps
        through the compiled graph (inference/compiled.py); None = the process default (`--compile`)."""
        ctx = model.config.max_position_embeddings
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_length = min(int(max_length or ctx), ctx)
        self.prefill_chunk = max(1, int(prefill_chunk))
        self._chunked: Request | None = None  # the prompt being prefilled in chunks (in the last cache row)
        v = model.config.vocab_size
        drafter = None
        if speculative or (speculative is None and len(getattr(model, "mtp", ()))):
            k = check_speculative(model, num_speculative_tokens)
            drafter = MTPDrafter(model, self.max_batch_size, self.max_length, k, cache_mode)
        self.speculative = bool(speculative)
        extra = drafter.k if drafter is not None else 0  # verification writes K slots past the last token
        self.batch = DecodeBatch(model, new_cache(model, self.max_batch_size, self.max_length + extra, cache_mode),
                                 PenaltyState.create([[]] * self.max_batch_size, v, model.device, active=True),
                                 drafter=drafter, compile=compile)
        self.batch.drafts_for = self._wants  # the drafter keeps state only for requests that speculate
        self._waiting: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self.prefill_forwards = 0  # forwards spent on prompts (a batched prefill counts once)
        self.prefilled_requests = 0

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None,
                    **options) -> str:
        """Queue a request; returns its id. Raises GenerationError for bad input (thread-safe)."""
        params = (params or SamplingParams()).replace(**options) if options else (params or SamplingParams())
        params.validate(self.model.config.vocab_size)
        ids = [int(i) for i in prompt_ids]
        v = self.model.config.vocab_size
        if not ids:
            raise GenerationError("empty prompt: give at least one token")
        if any(i < 0 or i >= v for i in ids):
            raise GenerationError(f"prompt token ids must be in [0, {v})")
        if len(ids) + params.max_new_tokens > self.max_length:
            raise GenerationError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                                  f"the engine's max_length ({self.max_length})")
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need an engine with a tokenizer")
        if params.speculative and self.batch.drafter is None:
            raise GenerationError("speculative decoding is off here: it needs a model with MTP modules "
                                  "(num_nextn_predict_layers > 0) and a server not started with --no-speculative")
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if any(r.id == rid for r in self._all()):
                raise GenerationError(f"request id {rid!r} is already in use")
            self._waiting.append(Request(rid, ids, params))
        return rid

    def cancel(self, request_id: str) -> bool:
        """Ask to end a request at the next step (thread-safe); False if it is unknown or finished."""
        with self._lock:
            known = any(r.id == request_id for r in self._all())
            if known:
                self._cancelled.add(request_id)
            return known

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self._waiting or self._chunked is not None)

    def _all(self) -> list[Request]:
        """Every request the engine holds (waiting, being prefilled in chunks, running)."""
        return list(self._waiting) + self.running + ([self._chunked] if self._chunked is not None else [])

    @property
    def running(self) -> list[Request]:
        """The running requests; running[i] lives in row i of the decode batch's cache."""
        return self.batch.rows

    @property
    def cache(self):
        return self.batch.cache

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def step(self) -> list[TokenEvent]:
        """Advance every request by one token (see the module docstring); returns the events."""
        with self._step_lock, torch.no_grad():
            events = self._cancel_pending()
            if self.running:
                wants = [self._wants(r) for r in self.running]
                events += self._speculate(wants) if any(wants) else self._decode()
            events += self._admit()
            return events

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, **options) -> list[Completion]:
        """Run `prompts` to completion (convenience for scripts and tests); results in prompt order."""
        ids = [self.add_request(p, params, **options) for p in prompts]
        out = {i: Completion(i, [], "", "", []) for i in ids}
        while any(not c.finish_reason for c in out.values()):
            for ev in self.step():
                c = out.get(ev.request_id)
                if c is None:
                    continue
                if ev.token_id is not None:
                    c.token_ids.append(ev.token_id)
                if ev.logprob is not None:
                    c.logprobs.append(ev.logprob)
                c.text += ev.text
                c.finish_reason = ev.finish_reason or ""
        return [out[i] for i in ids]

    # ------------------------------------------------------------------ internals

    def _cancel_pending(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.id in cancelled]
            self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
        events = []
        for req in waiting:
            req.state = SequenceState(req.params, set(), self.tokenizer)
            events.append(self._end(req, "cancelled"))
        for i in reversed(range(len(self.running))):
            req = self.running[i]
            if req.id in cancelled:
                events.append(self._end(req, "cancelled"))
                self._remove_row(i)
        if self._chunked is not None and self._chunked.id in cancelled:
            events.append(self._end(self._chunked, "cancelled"))
            self._drop_chunked()
        return events

    def _failed(self, req: Request, error: Exception) -> TokenEvent:
        """The last event of a request that raised `error` (it leaves the engine; the others go on)."""
        if req.state is not None and req.state.finish_reason is None:
            req.state.finish_reason = "error"
        index = len(req.state.tokens) if req.state is not None else 0
        return TokenEvent(req.id, None, "", index, finish_reason="error", error=error)

    def _end(self, req: Request, reason: str) -> TokenEvent:
        text = req.state.finish(reason)
        return TokenEvent(req.id, None, text, len(req.state.tokens), finish_reason=req.state.finish_reason)

    def _remove_row(self, i: int) -> None:
        """Free row i (the decode batch moves its last row into it)."""
        self.batch.remove(i)

    def _choose(self, logits: torch.Tensor, lo: int, hi: int) -> list[TokenEvent]:
        """Pick tokens for rows [lo, hi) from logits [n,V] (the decode batch's rule); emit events with logprobs.
        A row whose sampling or stop handling raises ends alone (finish_reason "error")."""
        reqs = self.running[lo:hi]
        tok, pieces, errors = self.batch.choose(logits, lo, hi, isolate=True)
        want = [r.params.logprobs for r in reqs]
        lp = top_v = top_i = None
        if any(w is not None for w in want):
            lp, top_v, top_i = token_logprobs(logits, tok, max(w or 0 for w in want))
            lp, top_v, top_i = lp.tolist(), top_v.tolist(), top_i.tolist()
        events = []
        for j, (req, t, piece) in enumerate(zip(reqs, tok.tolist(), pieces)):
            if j in errors:
                events.append(self._failed(req, errors[j]))
                continue
            ev = TokenEvent(req.id, t, piece, len(req.state.tokens) - 1, finish_reason=req.state.finish_reason)
            if want[j] is not None:
                ev.logprob = lp[j]
                ev.top_logprobs = list(zip(top_i[j][: want[j]], top_v[j][: want[j]]))
            events.append(ev)
        return events

    def _wants(self, req: Request) -> bool:
        """Whether `req` speculates this step (it asked, or the engine's default; a drafter is needed)."""
        want = req.params.speculative if req.params.speculative is not None else self.speculative
        return bool(want) and self.batch.drafter is not None and drafts_apply(req.params)

    def _speculate(self, wants: list[bool]) -> list[TokenEvent]:
        """One speculative step (`DecodeBatch.speculate`): one event per emitted token, in order."""
        try:
            tokens, pieces, logits, errors = self.batch.speculate(wants, isolate=True)
        except Exception as e:  # noqa: BLE001 - the batch forward failed: it ends the running requests only
            events = [self._failed(r, e) for r in self.running]
            self.batch.retire()
            return events
        events = []
        for i, req in enumerate(self.running):
            toks, n = tokens[i], len(req.state.tokens)
            lp = top_v = top_i = None
            if req.params.logprobs is not None and toks:
                lp, top_v, top_i = token_logprobs(logits[i, :len(toks)], torch.tensor(toks, device=logits.device),
                                                  req.params.logprobs)
                lp, top_v, top_i = lp.tolist(), top_v.tolist(), top_i.tolist()
            for j, (t, piece) in enumerate(zip(toks, pieces[i])):
                last = j == len(toks) - 1
                ev = TokenEvent(req.id, t, piece, n - len(toks) + j,
                                finish_reason=req.state.finish_reason if last and i not in errors else None)
                if lp is not None:
                    ev.logprob, ev.top_logprobs = lp[j], list(zip(top_i[j], top_v[j]))
                events.append(ev)
            if i in errors:
                events.append(self._failed(req, errors[i]))
        self.batch.retire()
        return events

    def _decode(self) -> list[TokenEvent]:
        """One decoding step of every running request (a failing forward ends the running requests only)."""
        try:
            logits = self.batch.decode()
        except Exception as e:  # noqa: BLE001 - the batch forward failed: it ends the running requests only
            events = [self._failed(r, e) for r in self.running]
            self.batch.retire()
            return events
        events = self._choose(logits, 0, len(self.running))
        self.batch.retire()
        return events

    def _admit(self) -> list[TokenEvent]:
        """Chunked prefill (one chunk of the long prompt in progress), then batched prefills of short prompts,
        about `prefill_chunk` prompt tokens in all (at least one batch while rows are free)."""
        events, budget = [], self.prefill_chunk
        if self._chunked is None:
            events += self._start_chunked()
        if self._chunked is not None:
            events += self._prefill_next_chunk()
            budget = 0
        first = True
        while self._free_rows() > 0 and (budget > 0 or first):
            batch = self._take_prefill_batch(self._free_rows(), max(budget, 1) if not first else self.prefill_chunk)
            if not batch:
                break
            first = False
            budget -= max(len(r.prompt_ids) for r in batch) * len(batch)
            events += self._prefill(batch)
        self.batch.retire()
        return events

    def _free_rows(self) -> int:
        return self.max_batch_size - len(self.running) - (self._chunked is not None)

    def _start_chunked(self) -> list[TokenEvent]:
        """Take the first waiting prompt longer than `prefill_chunk` into the last cache row, if it is free."""
        if self._free_rows() < 1:
            return []
        with self._lock:
            req = next((r for r in self._waiting if len(r.prompt_ids) > self.prefill_chunk), None)
            if req is None:
                return []
            self._waiting.remove(req)
        try:
            self._setup(req)
        except Exception as e:  # noqa: BLE001 - this request's setup failed: it ends alone
            return [self._failed(req, e)]
        self.batch.reset_rows([self.max_batch_size - 1])
        req.prefilled = 0
        self._chunked = req
        return []

    def _setup(self, req: Request) -> None:
        """A request's decoding state and generator (raises for bad per-request settings)."""
        req.state = SequenceState(req.params, stop_ids(req.params, self.model.config.eos_token_id), self.tokenizer)
        req.generator = make_generator(req.params.seed, self.model.device)

    def _drop_chunked(self) -> None:
        self.batch.reset_rows([self.max_batch_size - 1])
        self._chunked = None

    def _prefill_next_chunk(self) -> list[TokenEvent]:
        """Encode the next `prefill_chunk` tokens of the chunked prompt; after its last chunk the row joins
        the running rows and the request's first token is chosen."""
        req, r = self._chunked, self.max_batch_size - 1
        try:
            end = min(req.prefilled + self.prefill_chunk, len(req.prompt_ids))
            ids = torch.tensor([req.prompt_ids[req.prefilled:end]], device=self.model.device)
            drafter = self.batch.drafter
            out = self.model(ids, cache=self.cache.rows(r, r + 1), logits_to_keep=1, return_hidden=drafter is not None)
            logits = out.logits[:, -1]
            if drafter is not None and self._wants(req):
                drafter.add_prompt(r, req.prompt_ids[req.prefilled:end], out.hidden_states[0])
        except Exception as e:  # noqa: BLE001 - ends this request only
            self._drop_chunked()
            return [self._failed(req, e)]
        self.prefill_forwards += 1
        req.prefilled = end
        if end < len(req.prompt_ids):
            return []
        n = len(self.running)
        if n != r:
            self.batch.move_row(r, n)
        self._chunked = None
        if n != r:
            self.batch.reset_rows([r])
        self.batch.penalties.reset_row(n, req.prompt_ids)
        self.prefilled_requests += 1
        self.running.append(req)
        return self._choose(logits, n, n + 1)

    def _take_prefill_batch(self, free: int, max_tokens: int = PREFILL_MAX_TOKENS) -> list[Request]:
        """Take up to `free` waiting requests (FIFO, skipping prompts left for chunked prefill) to prefill
        together, left-padded to the longest.

        A request joins while the padding stays small (padded tokens <= PREFILL_PAD_FACTOR x real tokens
        + PREFILL_PAD_SLACK), the batch stays under min(PREFILL_MAX_TOKENS, max_tokens) padded tokens, and
        every row still fits the cache (pad slots occupy cache slots: padded length + max_new_tokens <=
        max_length).
        """
        batch: list[Request] = []
        limit = min(PREFILL_MAX_TOKENS, max_tokens)
        with self._lock:
            for nxt in self._waiting:
                if len(batch) >= free:
                    break
                if len(nxt.prompt_ids) > self.prefill_chunk:
                    continue
                group = batch + [nxt]
                longest = max(len(r.prompt_ids) for r in group)
                padded, real = longest * len(group), sum(len(r.prompt_ids) for r in group)
                if padded > limit or (batch and (padded > PREFILL_PAD_FACTOR * real + PREFILL_PAD_SLACK or any(
                        longest + r.params.max_new_tokens > self.max_length for r in group))):
                    break
                batch.append(nxt)
            taken = {id(r) for r in batch}
            self._waiting = deque(r for r in self._waiting if id(r) not in taken)
        return batch

    def _prefill(self, batch: list[Request]) -> list[TokenEvent]:
        """Encode the prompts of `batch` into fresh rows [n, n+k) in one forward; choose their first tokens."""
        events, ready = [], []
        for req in batch:
            try:
                self._setup(req)
                ready.append(req)
            except Exception as e:  # noqa: BLE001 - this request's setup failed: it ends alone
                events.append(self._failed(req, e))
        if not ready:
            return events
        lo, hi = self.batch.admit(ready, [r.prompt_ids for r in ready])
        try:
            ids, mask = prepare_inputs(self.model, [r.prompt_ids for r in ready])  # left-padded, with its mask
            logits = self.batch.prefill(lo, hi, ids, mask)
        except Exception as e:  # noqa: BLE001 - the prefill forward failed: it ends this batch only
            for i in reversed(range(lo, hi)):
                self.batch.remove(i)
            return events + [self._failed(r, e) for r in ready]
        self.prefill_forwards += 1
        self.prefilled_requests += len(ready)
        return events + self._choose(logits, lo, hi)
