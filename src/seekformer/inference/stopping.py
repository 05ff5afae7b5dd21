"""Stop conditions and streaming text: eos / stop ids, stop strings, max length, UTF-8-safe pieces.

`SequenceState` follows one generated sequence token by token. It owns the token list, the text emitted
so far (when a tokenizer is given) and the finish reason ("stop" for eos, a stop id or a stop string;
"length" for max_new_tokens). Text comes out in pieces that never split a multi-byte UTF-8 character
and never show any part of a stop string: a tail that could still grow into a stop string is held back
until it either completes it (and is dropped) or cannot (and is released).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

import torch

from .sampling import SamplingParams


class Detokenizer:
    """Incremental decoding of token ids to text pieces.

    With a tokenizer that has `token_bytes(id)` (seekformer's byte-level BPE), bytes go through an
    incremental UTF-8 decoder, so a character split across tokens is emitted once complete. Otherwise the
    window method is used: decode a few ids before the new one and emit the text that grew, holding back
    while the text ends with the replacement character U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.special = set(_special_ids(tokenizer)) if skip_special_tokens else set()
        self.use_bytes = hasattr(tokenizer, "token_bytes")
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self._prefix = 0  # window method: ids[prefix:read] were decoded to text already emitted
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly "")."""
        if self.use_bytes:
            if token_id in self.special:
                return ""
            return self._utf8.decode(self.tok.token_bytes(int(token_id)))
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=self.skip)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        if self.use_bytes:
            return self._utf8.decode(b"", final=True)
        before = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=self.skip)
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


def _special_ids(tokenizer) -> Iterable[int]:
    for name in ("special_token_ids", "all_special_ids"):  # SeekTokenizer: {token: id}; transformers: [id]
        ids = getattr(tokenizer, name, None)
        if ids is not None:
            return ids.values() if isinstance(ids, dict) else ids
    return [i for i in (getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
            if i is not None]


class StopStringFilter:
    """Cuts a text stream at the first stop string; `push(piece)` -> (text safe to emit, stopped)."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0  # longest tail of buf that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def stop_ids(params: SamplingParams, config_eos: int | None) -> set[int]:
    """Token ids that end a sequence: eos (unless ignore_eos) and `stop_token_ids`."""
    ids = set(int(i) for i in params.stop_token_ids)
    if not params.ignore_eos:
        eos = params.eos_token_id if params.eos_token_id is not None else config_eos
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(i) for i in eos)
    return ids


def stop_allowed(params: SamplingParams, generated: int) -> bool:
    """The `min_new_tokens` rule, the one place it is written: may the token that follows `generated`
    generated tokens be a stop id (eos or a stop id)?"""
    return generated >= params.min_new_tokens


def early_stop_mask(states: Sequence[SequenceState], vocab: int, device, steps: int | None = None
                    ) -> torch.Tensor | None:
    """Stop ids that `stop_allowed` forbids: bool [B,V] for each row's next token, or [B,steps,V] for the
    next `steps` tokens (speculative verification); None when no row is affected (the common case)."""
    n = 1 if steps is None else steps
    if all(stop_allowed(s.params, len(s.tokens)) for s in states):
        return None
    mask = torch.zeros(len(states), n, vocab, dtype=torch.bool, device=device)
    for r, s in enumerate(states):
        ids = sorted(s.eos_ids)
        for j in range(n):
            if ids and not stop_allowed(s.params, len(s.tokens) + j):
                mask[r, j, ids] = True
    return mask[:, 0] if steps is None else mask


class SequenceState:
    """One sequence being generated: tokens, streamed text, finish reason."""

    def __init__(self, params: SamplingParams, eos_ids: set[int], tokenizer=None) -> None:
        self.params = params
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""  # emitted text (stop strings excluded)
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.filter = StopStringFilter(params.stop) if self.detok is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> str:
        """Record a generated token; returns the new text piece (empty without a tokenizer)."""
        token = int(token)
        self.tokens.append(token)
        piece, by_string = "", False
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif self.detok is not None:
            piece, by_string = self.filter.push(self.detok.push(token))
            if by_string:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None and not by_string:
            piece += self._drain()
        self.text += piece
        return piece

    def _drain(self) -> str:
        out, stopped = self.filter.push(self.detok.flush())
        return out if stopped else out + self.filter.flush()

    def finish(self, reason: str) -> str:
        """End the sequence from outside (cancel); returns any held-back text."""
        if self.finish_reason is None:
            self.finish_reason = reason
            if self.detok is not None:
                piece = self._drain()
                self.text += piece
                return piece
        return ""
