"""Constrained decoding: a token mask per step so the output follows a JSON schema (or any JSON object).

    c = json_constraint(tokenizer, vocab_size, schema={"type": "object", ...})   # or schema=None: any object
    params = SamplingParams(max_new_tokens=200, constraint=c)                     # one constraint per sequence

`sampling.choose` asks each row's constraint for `allowed()` (a bool tensor [V], None = no restriction)
before sampling and calls `advance(token)` with the chosen token. The grammar engine is llguidance (the
`serve` extra): it compiles the schema into a grammar over the tokenizer's byte strings and computes the
mask in microseconds. When the value is complete the mask allows only the stop tokens given
(eos and the chat template's end-of-turn tokens), so the reply ends there and always parses and
validates -- unless `max_new_tokens` runs out first (finish_reason "length"), as with OpenAI.

Errors: an invalid JSON schema raises `SchemaError`; a valid schema the grammar engine cannot
constrain (look-around regexes, unsupported keywords) raises `UnconstrainableSchema`. Both are
SeekformerErrors (HTTP 400 in the server).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from ..errors import GenerationError

# Compact JSON (no free whitespace: a model cannot stall in indentation) and no bare-string escapes surprises.
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}


class SchemaError(GenerationError):
    """The JSON schema itself is invalid."""


class UnconstrainableSchema(GenerationError):
    """A valid schema that constrained decoding cannot enforce."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GenerationError("structured output needs llguidance: pip install 'seekformer[serve]'") from None
    return llguidance


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer_json: str, vocab_size: int, stop_ids: tuple[int, ...]):
    """llguidance's view of a tokenizer (token byte strings; ~0.2 s to build, so cached)."""
    return _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(stop_ids))


def ll_tokenizer(tokenizer, vocab_size: int, stop_ids) -> Any:
    """The cached llguidance tokenizer of a SeekTokenizer for a model with `vocab_size` logits."""
    return _ll_tokenizer(tokenizer._tok.to_str(), int(vocab_size), tuple(int(i) for i in stop_ids))


def check_schema(schema: Any) -> dict:
    """Raise SchemaError (saying what is wrong) unless `schema` is a valid JSON schema object."""
    import jsonschema

    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise SchemaError(f"invalid JSON schema at {where}: {e.message}") from None
    return schema


def compile_schema(schema: dict | None, tokenizer, vocab_size: int, stop_ids) -> str:
    """The llguidance grammar of `schema` (None: any JSON object), checked against the tokenizer."""
    ll = _llguidance()
    schema = ANY_OBJECT if schema is None else check_schema(schema)
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as e:
        raise SchemaError(f"invalid JSON schema: {e}") from None
    err = ll.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer, vocab_size, stop_ids))
    if err and not err.startswith("WARNING"):
        raise UnconstrainableSchema(f"this JSON schema cannot be enforced by constrained decoding: "
                                    f"{err.strip().splitlines()[-1]}")
    return grammar


class GrammarConstraint:
    """A per-sequence token mask from an llguidance grammar (see the module docstring).

    `allowed()` -> bool [V] on `device`; `advance(token)` consumes a chosen token; `text` is nothing
    more than a convenience for debugging. Not thread-safe; one object per sequence (`fork()` copies).
    """

    def __init__(self, grammar: str, ll_tok, vocab_size: int, stop_ids, device="cpu") -> None:
        ll = _llguidance()
        self.grammar, self.ll_tok = grammar, ll_tok
        self.vocab_size = int(vocab_size)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.device = device
        self.matcher = ll.LLMatcher(ll_tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise UnconstrainableSchema(f"cannot build the grammar: {self.matcher.get_error()}")
        self._bits = torch.arange(32, dtype=torch.int32)
        self.done = False

    def fork(self) -> GrammarConstraint:
        """A fresh constraint over the same grammar (for another sequence)."""
        return GrammarConstraint(self.grammar, self.ll_tok, self.vocab_size, self.stop_ids, self.device)

    def allowed(self, token_ids=None) -> torch.Tensor | None:
        """Tokens that keep the output inside the grammar (stop tokens only once it is complete)."""
        if self.done:
            return None
        if self.matcher.is_error():  # cannot happen when every token goes through advance(); be safe: stop
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[list(self.stop_ids)] = True
            return mask.to(self.device)
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        mask = ((words[:, None] >> self._bits) & 1).flatten()[: self.vocab_size].bool()
        return mask.to(self.device)

    def advance(self, token: int) -> None:
        token = int(token)
        if self.done:
            return
        if token in self.stop_ids:
            self.done = True
            return
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """True when what was generated so far is a full value of the grammar."""
        return self.done or self.matcher.is_accepting()


def json_constraint(tokenizer, vocab_size: int, schema: dict | None = None, stop_ids=None,
                    device="cpu") -> GrammarConstraint:
    """A constraint for one JSON value following `schema` (None: any JSON object); `stop_ids` default to
    the tokenizer's eos and end-of-turn tokens."""
    stops = tuple(stop_ids) if stop_ids is not None else tuple(tokenizer.stop_token_ids)
    grammar = compile_schema(schema, tokenizer, vocab_size, stops)
    return GrammarConstraint(grammar, ll_tokenizer(tokenizer, vocab_size, stops), vocab_size, stops, device)


def constraint_masks(constraints, like: torch.Tensor) -> torch.Tensor | None:
    """[B,V] bool of allowed tokens for rows with a constraint (all True for the others); None when no row
    has one. `like` gives B, V and the device."""
    if not any(c is not None for c in constraints):
        return None
    mask = torch.ones_like(like, dtype=torch.bool)
    for r, c in enumerate(constraints):
        if c is None:
            continue
        allowed = c.allowed()
        if allowed is not None:
            n = min(allowed.shape[0], mask.shape[1])
            mask[r, :n] = allowed[:n].to(mask.device)
            mask[r, n:] = False
    return mask


__all__ = ["GrammarConstraint", "json_constraint", "compile_schema", "check_schema", "constraint_masks",
           "SchemaError", "UnconstrainableSchema", "ll_tokenizer"]
