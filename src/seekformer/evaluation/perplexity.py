"""Perplexity and bits per byte with a sliding window, on the one scorer (`inference.scoring`).

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
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..errors import DataError, SeekformerError
from ..inference.scoring import score_tokens


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
