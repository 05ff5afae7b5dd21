"""Sampling parameters and the logits pipeline: penalties, temperature, top-k, top-p, min-p, sampling.

Shapes: B rows (sequences), V vocabulary. Every function works on a batch whose rows may each have
their own `SamplingParams` (continuous batching mixes requests), vectorised over rows.

Order, as in `transformers` and vLLM: repetition penalty (prompt + generated tokens), frequency and
presence penalties (generated tokens), then for sampled rows temperature, top-k, top-p and min-p, then
a draw from the renormalised distribution with the row's `torch.Generator`. Greedy rows take the argmax
of the penalised logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from ..errors import GenerationError


@dataclass
class SamplingParams:
    """How one sequence is decoded. `do_sample=False` (or temperature 0) means greedy."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # CTRL-style: logit/p if > 0 else logit*p, on prompt + generated tokens
    frequency_penalty: float = 0.0  # OpenAI-style: logit -= f * count(generated)
    presence_penalty: float = 0.0  # OpenAI-style: logit -= p * [count(generated) > 0]
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides eos
    eos_token_id: int | tuple[int, ...] | None = None  # None: the model's config.eos_token_id
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token's logprob + n top alternatives
    # constrained decoding (inference/constrained.py): an object with allowed() -> bool [V] | None and
    # advance(token); one per sequence (stateful), applied in `choose`
    constraint: object | None = field(default=None, compare=False, repr=False)
    # MTP self-speculative decoding in the serving engine (greedy rows): None = the engine's default
    speculative: bool | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def truncated(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword options, as `generate()` receives them; unknown names raise GenerationError."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(kwargs) - names)
        if bad:
            raise GenerationError(f"unknown generation option(s): {', '.join(bad)}")
        kw = dict(kwargs)
        if isinstance(kw.get("stop"), str):
            kw["stop"] = (kw["stop"],)
        for k in ("stop", "stop_token_ids"):
            if kw.get(k) is None:
                kw.pop(k, None)
            else:
                kw[k] = tuple(kw[k])
        if isinstance(kw.get("eos_token_id"), (list, tuple)):
            kw["eos_token_id"] = tuple(int(i) for i in kw["eos_token_id"])
        return cls(**kw)

    def replace(self, **changes) -> SamplingParams:
        return replace(self, **changes)

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise GenerationError (one line, says what to fix) for out-of-range values; returns self."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise GenerationError(msg)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        need(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens,
             f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        need(math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0, got {self.temperature}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(self.seed is None or -(2 ** 63) <= int(self.seed) < 2 ** 64, f"seed must fit in 64 bits, got {self.seed}")
        if vocab_size is not None:
            need(all(0 <= int(i) < vocab_size for i in self.stop_token_ids),
                 f"stop_token_ids must be in [0, {vocab_size})")
        return self


@dataclass
class PenaltyState:
    """Per-row token statistics for penalties: `seen` [B,V] (prompt + generated), `counts` [B,V] (generated)."""

    seen: torch.Tensor
    counts: torch.Tensor
    active: bool = field(default=True)

    @classmethod
    def create(cls, prompts: Sequence[Sequence[int]], vocab_size: int, device, active: bool = True) -> PenaltyState:
        b = len(prompts)
        if not active:  # nothing to track: 1-column placeholders keep the interface
            z = torch.zeros(b, 1, device=device)
            return cls(z.bool(), z, False)
        seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
        for r, p in enumerate(prompts):
            if len(p):
                seen[r, torch.as_tensor(list(p), dtype=torch.long, device=device)] = True
        return cls(seen, torch.zeros(b, vocab_size, device=device), True)

    def update(self, tokens: torch.Tensor) -> None:
        """Record one new token per row, tokens [B] (negative = none)."""
        if not self.active:
            return
        ok = tokens >= 0
        rows = torch.arange(tokens.shape[0], device=tokens.device)[ok]
        self.seen[rows, tokens[ok]] = True
        self.counts[rows, tokens[ok]] += 1

    def reset_row(self, row: int, prompt: Sequence[int]) -> None:
        if not self.active:
            return
        self.seen[row] = False
        self.counts[row] = 0
        if len(prompt):
            self.seen[row, torch.as_tensor(list(prompt), dtype=torch.long, device=self.seen.device)] = True

    def select(self, index: torch.Tensor) -> None:
        self.seen, self.counts = self.seen.index_select(0, index), self.counts.index_select(0, index)


def _row_tensor(params: Sequence[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(getattr(p, name)) for p in params], dtype=like.dtype, device=like.device)[:, None]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], state: PenaltyState) -> torch.Tensor:
    """logits [B,V] (float32) -> penalised logits [B,V]."""
    if not state.active or not any(p.penalised for p in params):
        return logits
    rep = _row_tensor(params, "repetition_penalty", logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(state.seen, penalised, logits)
    freq = _row_tensor(params, "frequency_penalty", logits)
    pres = _row_tensor(params, "presence_penalty", logits)
    return logits - freq * state.counts - pres * (state.counts > 0).to(logits.dtype)


def truncate(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p filtering: logits [B,V] -> scaled logits with -inf outside."""
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=logits.dtype,
                        device=logits.device)[:, None]
    logits = logits / temp
    if not any(p.truncated for p in params):
        return logits
    v = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(v, device=logits.device)[None]
    k = torch.tensor([p.top_k if p.top_k > 0 else v for p in params], device=logits.device)[:, None]
    top_p = _row_tensor(params, "top_p", logits)
    min_p = _row_tensor(params, "min_p", logits)
    remove = rank >= k
    remove |= ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)  # smallest prefix reaching top_p
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded with `seed` (None: unseeded, drawn from torch's global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def choose(logits: torch.Tensor, params: Sequence[SamplingParams], state: PenaltyState,
           generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
           banned: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row: logits [B,V] -> tokens [B].

    `generators` is one generator for the whole batch or one per row; `banned` [B,V] bool masks tokens
    (eos before min_new_tokens). A row whose params carry a `constraint` samples only among the tokens
    it allows, and the constraint is advanced with the chosen token.
    """
    logits = apply_penalties(logits.float(), params, state)
    constraints = [p.constraint for p in params]
    allowed = None
    if any(c is not None for c in constraints):
        from .constrained import constraint_masks

        allowed = constraint_masks(constraints, logits)
    if banned is not None:
        if allowed is not None:  # a constraint that only allows a stop token wins over min_new_tokens
            banned = banned & (allowed & ~banned).any(-1, keepdim=True)
        logits = logits.masked_fill(banned, float("-inf"))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = _pick(logits, params, generators)
    if allowed is not None:
        for c, t in zip(constraints, out.tolist()):
            if c is not None:
                c.advance(t)
    return out


def _pick(logits: torch.Tensor, params: Sequence[SamplingParams],
          generators: Sequence[torch.Generator | None] | torch.Generator | None) -> torch.Tensor:
    """Greedy argmax or a draw from the truncated distribution, per row: logits [B,V] -> tokens [B]."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    probs = truncate(logits, params).softmax(dim=-1)
    out = logits.argmax(dim=-1)
    if generators is None or isinstance(generators, torch.Generator):
        idx = [r for r, g in enumerate(greedy) if not g]
        drawn = torch.multinomial(probs[idx], 1, generator=generators).squeeze(1)
        out[idx] = drawn
        return out
    for r, g in enumerate(greedy):
        if not g:
            out[r] = torch.multinomial(probs[r], 1, generator=generators[r])[0]
    return out


def speculative_sample(probs: torch.Tensor, drafts: Sequence[int], generator: torch.Generator | None = None
                       ) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for drafts proposed deterministically
    (the draft distribution q is one-hot on the draft): probs [K+1,V] are the target distributions at the
    K+1 verified positions, given the drafts before each. Draft j is accepted with probability p_j(d_j);
    at the first rejection the token is drawn from p_j with d_j removed, renormalised ((p - q)+); after K
    acceptances one more token is drawn from p_K. Returns the accepted drafts and that one token: each token
    follows the target distribution exactly, as plain sampling would give."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        p = probs[j]
        if float(torch.rand((), generator=generator, device=p.device)) < float(p[d]):
            out.append(int(d))
            continue
        resid = p.clone()
        resid[d] = 0.0
        if float(resid.sum()) <= 0:  # p is one-hot on d (then the draw above accepts it): numerical guard
            out.append(int(d))
            continue
        out.append(int(torch.multinomial(resid, 1, generator=generator)[0]))
        return out
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)[0]))
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0):
    """Log-probabilities of the model's (unprocessed) distribution: logits [B,V], tokens [B].

    Returns (chosen [B], top_values [B,n], top_ids [B,n]).
    """
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    if top_n > 0:
        vals, ids = logp.topk(top_n, dim=-1)
    else:
        vals = ids = logp.new_zeros(logp.shape[0], 0)
    return chosen, vals, ids
