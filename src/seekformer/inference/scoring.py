"""The one scorer: log-probabilities of given tokens under the model (evaluation and serving use it).

Shapes: B sequences, T tokens, V vocabulary.

    score_tokens(model, [ids, ...], top_n=0)  -> per sequence, log p(ids[j+1] | ids[:j+1]) for every j
                                                 (+ the top_n alternatives: a completions API's logprobs)
    loglikelihood(model, [(ctx, cont), ...])  -> per pair, (sum log p(cont | ctx), cont is the greedy output)
    next_token_logprobs(model, [ctx, ...])    -> log p(next token | ctx) [N,V]

`loglikelihood` is lm-evaluation-harness' contract; an empty context starts from the model's bos token
(else eos). Sequences are scored in batches of similar length (one forward each, no cache) within a
logits memory budget; contexts longer than the model context keep their last tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import GenerationError

#: Logits kept in memory at once by the batched scorer (B * T * V floats).
LOGITS_BUDGET = 1 << 25


@dataclass
class TokenScores:
    """Scores of one sequence of L tokens: `logprobs` [L-1] float64 and `greedy` [L-1] bool, where entry j
    is about token j+1 given tokens 0..j (`greedy[j]`: token j+1 is the argmax of the model there)."""

    logprobs: torch.Tensor
    greedy: torch.Tensor
    top_ids: torch.Tensor | None = None  # [L-1, top_n] most likely tokens at each position (when asked)
    top_logprobs: torch.Tensor | None = None  # [L-1, top_n] their log-probabilities


def _batches(lengths: Sequence[int], vocab: int, batch_size: int | None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) within the logits budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out:
            cur = out[-1]
            longest = lengths[cur[0]]
            fits = (len(cur) + 1) * longest * vocab <= LOGITS_BUDGET
            if fits and (batch_size is None or len(cur) < batch_size):
                cur.append(i)
                continue
        out.append([i])
    return out


@torch.inference_mode()
def score_tokens(model, sequences: Sequence[Sequence[int]], batch_size: int | None = None,
                 top_n: int = 0) -> list[TokenScores]:
    """Log-probability of every token after the first, for each sequence (run in batches, right-padded).

    Sequences must fit the model context (`config.max_position_embeddings`) and hold >= 1 token.
    `top_n` > 0 also returns the `top_n` most likely tokens at each position.
    """
    ctx = model.config.max_position_embeddings
    vocab = model.config.vocab_size
    for s in sequences:
        if not 1 <= len(s) <= ctx:
            raise GenerationError(f"cannot score a sequence of {len(s)} tokens: the model context is {ctx}")
    was_training = model.training
    model.eval()
    out: list[TokenScores | None] = [None] * len(sequences)
    try:
        for idx in _batches([len(s) for s in sequences], vocab, batch_size):
            t = max(len(sequences[i]) for i in idx)
            ids = torch.zeros(len(idx), t, dtype=torch.long)
            mask = torch.zeros(len(idx), t, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(sequences[i])] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
                mask[r, : len(sequences[i])] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            logits = model(ids, attention_mask=mask).logits.float()  # [B,T,V]
            logp = logits[:, :-1].log_softmax(-1)
            target = ids[:, 1:]
            chosen = logp.gather(-1, target[..., None]).squeeze(-1).double().cpu()
            greedy = (logp.argmax(-1) == target).cpu()
            top_v = top_i = None
            if top_n > 0:
                top_v, top_i = logp.topk(min(top_n, vocab), dim=-1)
                top_v, top_i = top_v.double().cpu(), top_i.cpu()
            for r, i in enumerate(idx):
                n = len(sequences[i]) - 1
                out[i] = TokenScores(chosen[r, :n], greedy[r, :n], None if top_i is None else top_i[r, :n],
                                     None if top_v is None else top_v[r, :n])
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@torch.inference_mode()
def next_token_logprobs(model, contexts: Sequence[Sequence[int]], batch_size: int | None = None) -> torch.Tensor:
    """log p(next token | context) for each context: [N, V] float32 (contexts longer than the model
    context keep their last tokens). One forward per batch: cheaper than `loglikelihood` when every
    continuation is a single token (multiple-choice letters)."""
    ctx = model.config.max_position_embeddings
    seqs = [list(c)[-ctx:] for c in contexts]
    if any(not s for s in seqs):
        raise GenerationError("next_token_logprobs needs non-empty contexts")
    out = torch.empty(len(seqs), model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        for idx in _batches([len(s) for s in seqs], model.config.vocab_size, batch_size):
            t = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), t, dtype=torch.long)
            mask = torch.zeros(len(idx), t, dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: the last position is every row's next token
                ids[r, t - len(seqs[i]):] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[r, t - len(seqs[i]):] = 1
            logits = model(ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1).logits
            out[idx] = logits[:, -1].float().log_softmax(-1).cpu()
    finally:
        model.train(was_training)
    return out


def loglikelihood(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), continuation is what greedy decoding would produce) per request.

    Both parts are token-id lists; the context needs >= 1 token. When context + continuation exceed the
    model context, the context is cut from the left (as lm-evaluation-harness does). Requests whose
    continuation is one token share one forward per distinct context (the choices of a multiple-choice
    question cost one forward, not four).
    """
    ctx = model.config.max_position_embeddings
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    seqs, conts, long_idx = [], [], []
    single: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # context -> [(request index, token)]
    for i, (context, cont) in enumerate(requests):
        context, cont = [int(t) for t in context], [int(t) for t in cont]
        if not context:
            context = [start_token(model)]
        if not cont:
            raise GenerationError("loglikelihood needs a continuation of at least one token")
        if len(cont) >= ctx:
            raise GenerationError(f"continuation of {len(cont)} tokens does not fit the model context ({ctx})")
        if len(cont) == 1:
            single.setdefault(tuple(context[-(ctx - 1):]), []).append((i, cont[0]))
            continue
        seqs.append((context + cont)[-ctx:])
        conts.append(len(cont))
        long_idx.append(i)
    if single:
        contexts = list(single)
        logp = next_token_logprobs(model, contexts, batch_size)
        for row, c in zip(logp, contexts):
            best = int(row.argmax())
            for i, token in single[c]:
                out[i] = (float(row[token]), token == best)
    for i, s, n in zip(long_idx, score_tokens(model, seqs, batch_size), conts):
        out[i] = (float(s.logprobs[-n:].sum()), bool(s.greedy[-n:].all()))
    return out  # type: ignore[return-value]


def start_token(model) -> int:
    """The token an empty context starts from: the model's bos id, else its eos id."""
    cfg = model.config
    tok = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id
    if tok is None:
        raise GenerationError("empty context and the model has no bos/eos token to start from")
    return int(tok)
