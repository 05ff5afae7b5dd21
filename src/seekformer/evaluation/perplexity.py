"""Token log-likelihood scoring: perplexity and bits per byte with a sliding window, and the batched
scorer that multiple-choice tests and the lm-evaluation-harness adapter share.

Shapes: B sequences, T tokens, V vocabulary.

    score_tokens(model, [ids, ...])          -> per sequence, log p(ids[j+1] | ids[:j+1]) for every j
    loglikelihood(model, [(ctx, cont), ...]) -> per pair, (sum log p(cont | ctx), cont is the greedy output)
    evaluate_perplexity(model, tok, documents, window=W, stride=S) -> PerplexityResult

Perplexity scores each document on its own: the token ids of the text follow one prefix token (the
end-of-text id by default, as every document follows one in seekformer's training shards). A document
longer than the window is covered by windows of W tokens that start S tokens apart; each window scores
only the tokens no earlier window scored, so every token is predicted once, with up to W - S tokens of
context from the previous window (S = W: disjoint chunks; smaller S: more context, more compute).
Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes of the text: comparable across
tokenizers, unlike perplexity per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import DataError, SeekformerError

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
            raise SeekformerError(f"cannot score a sequence of {len(s)} tokens: the model context is {ctx}")
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
        raise SeekformerError("next_token_logprobs needs non-empty contexts")
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
            raise SeekformerError("loglikelihood needs a context of at least one token (e.g. the BOS id)")
        if not cont:
            raise SeekformerError("loglikelihood needs a continuation of at least one token")
        if len(cont) >= ctx:
            raise SeekformerError(f"continuation of {len(cont)} tokens does not fit the model context ({ctx})")
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


def rolling_windows(n_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of 1 prefix token + `n_targets` tokens.

    Returns (begin, end, first_scored) per window: the window feeds tokens [begin, end) (at most `window`)
    and scores targets first_scored .. end-1 (token positions; position 0, the prefix, is never a target).
    Every target is scored exactly once.
    """
    if window < 2:
        raise SeekformerError(f"the perplexity window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise SeekformerError(f"the stride must be in [1, window={window}], got {stride}")
    total = n_targets + 1
    out, scored, begin = [], 1, 0
    while scored < total:
        end = min(begin + window, total)
        out.append((begin, end, scored))
        scored = end
        begin += stride
        if begin >= scored:  # stride == window: the next window starts where scoring stopped, minus one
            begin = scored - 1
    return out


@dataclass
class PerplexityResult:
    """Totals over all documents: `nll` (nats), `tokens` scored, `bytes` (UTF-8) and `documents`."""

    nll: float
    tokens: int
    bytes: int
    documents: int
    window: int
    stride: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "nll_per_token": self.nll_per_token}


def evaluate_perplexity(model, tokenizer, documents: Iterable[str], window: int | None = None,
                        stride: int | None = None, prefix_token_id: int | None = None, max_tokens: int | None = None,
                        batch_size: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity and bits per byte of `documents` (strings) under `model`, with a sliding window.

    window: tokens fed at once (default: the model context); stride: tokens between window starts
    (default: window // 2). max_tokens: stop after about this many scored tokens (whole documents).
    progress: optional callable(tokens_scored_so_far).
    """
    ctx = model.config.max_position_embeddings
    window = int(window or ctx)
    if window > ctx:
        raise SeekformerError(f"window {window} exceeds the model context {ctx}: use --window {ctx} or less")
    stride = int(stride or max(1, window // 2))
    prefix = tokenizer.eos_token_id if prefix_token_id is None else int(prefix_token_id)
    nll, tokens, nbytes, docs = 0.0, 0, 0, 0
    for text in documents:
        ids = [prefix] + tokenizer.encode(text)
        if len(ids) < 2:
            continue
        wins = rolling_windows(len(ids) - 1, window, stride)
        scores = score_tokens(model, [ids[b:e] for b, e, _ in wins], batch_size)
        for (b, e, first), s in zip(wins, scores):
            nll -= float(s.logprobs[first - b - 1:].sum())
        tokens += len(ids) - 1
        nbytes += len(text.encode("utf-8"))
        docs += 1
        if progress is not None:
            progress(tokens)
        if max_tokens is not None and tokens >= max_tokens:
            break
    if tokens == 0:
        raise DataError("no text to score: the documents are empty")
    return PerplexityResult(nll, tokens, nbytes, docs, window, stride)


def builtin_validation_documents(seed: int = 0, val_fraction: float = 0.02) -> list[str]:
    """The documents of the built-in corpus that the quickstart recipe holds out for validation
    (`data.val_fraction` 0.02, seed 0): text the quickstart model never trained on."""
    from ..data.corpus import iter_documents
    from ..data.shards import is_validation

    docs = list(iter_documents(["builtin"]))
    held = [d for i, d in enumerate(docs) if is_validation(seed, i, val_fraction)]
    return held or docs[-1:]


def perplexity_documents(source: str, text_key: str = "text") -> Iterable[str]:
    """Documents of `source`: "builtin" (the quickstart validation documents), a text/.gz/.jsonl file, a
    directory, or "hf:NAME[:CONFIG]:SPLIT" (see `seekformer.data.corpus`)."""
    if source == "builtin":
        return builtin_validation_documents()
    from ..data.corpus import check_sources, iter_documents

    return iter_documents(check_sources([source]), text_key=text_key)
