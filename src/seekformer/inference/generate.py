"""`generate()`: the decoding entry point behind `SeekForCausalLM.generate`, plus text-level helpers.

Shapes: B prompts, T padded prompt length, N new tokens, V vocabulary.

    ids = generate(model, input_ids [B,T], attention_mask [B,T], max_new_tokens=N, ...)  -> [B, T + n]

Like `transformers`, the result is the (left-padded) prompt followed by the new tokens; rows that
finish early are padded with `pad_token_id` (the config's, else eos). The prompt is encoded once into
the latent KV cache; each step then feeds one token per row. Rows that finish leave the batch.
Options are those of `SamplingParams` plus the ones in `generate()`'s signature: beam search
(`num_beams`), MTP self-speculation (`speculative=True`), the cache layout and a tokenizer (needed
for stop strings and text).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import GenerationError
from .beam import beam_search
from .decoding import DecodeBatch, Row, check_context, new_cache, pad_id, prepare_inputs
from .sampling import PenaltyState, SamplingParams, make_generator
from .speculative import speculative_decode
from .stopping import SequenceState, stop_ids

__all__ = ["GenerateOutput", "decode_steps", "generate", "generate_text", "prepare_inputs", "stream"]


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict=True)` returns."""

    sequences: torch.Tensor  # [B, T + N]: prompts then new tokens, pad after the end
    new_tokens: list[list[int]]  # per row, the generated ids (eos / stop token included)
    finish_reasons: list[str]  # "stop" | "length"
    texts: list[str] | None = None  # per row, the generated text (with a tokenizer; stop strings cut)
    stats: dict = field(default_factory=dict)  # e.g. speculative acceptance rate


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                 tokenizer=None, cache_mode: str = "latent", compile: bool | None = None) -> Iterator[tuple[int, int, str, list[SequenceState]]]:
    """The plain decoding loop (greedy or sampling) as an iterator of (row, token, text piece, states).

    input_ids / attention_mask [B,T]. One KV cache of B rows and T + max_new_tokens slots is allocated
    up front; the `DecodeBatch` over it drops finished rows. One generator (params.seed) serves the batch.
    `compile`: steps through the compiled graph (inference/compiled.py); None = the process default.
    """
    cfg = model.config
    b, t = input_ids.shape
    eos = stop_ids(params, cfg.eos_token_id)
    states = [SequenceState(params, eos, tokenizer) for _ in range(b)]
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)] if params.penalised else [[]] * b
    pen = PenaltyState.create([[]] * b, cfg.vocab_size, input_ids.device, active=params.penalised)
    batch = DecodeBatch(model, new_cache(model, b, t + params.max_new_tokens, cache_mode), pen,
                        make_generator(params.seed, input_ids.device), compile=compile)
    lo, hi = batch.admit([Row(s, key=r) for r, s in enumerate(states)], prompts)
    logits = batch.prefill(lo, hi, input_ids, attention_mask)
    while True:
        tokens, pieces = batch.choose(logits, lo, hi)
        for row, token, piece in zip(batch.rows[lo:hi], tokens.tolist(), pieces):
            yield row.key, token, piece, states
        batch.retire()
        if not batch.rows:
            return
        logits, lo, hi = batch.decode(), 0, len(batch.rows)


def generate(model, input_ids, attention_mask=None, *, tokenizer=None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, speculative: bool = False,
             num_speculative_tokens: int | None = None, cache_mode: str = "latent", pad_token_id: int | None = None,
             return_dict: bool = False, compile: bool | None = None, **options) -> torch.Tensor | GenerateOutput:
    """Decode continuations of `input_ids` [B,T] (left padding marked by `attention_mask`).

    options: SamplingParams fields (max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
    repetition/frequency/presence penalties, seed, stop, stop_token_ids, eos_token_id, ...).
    Returns [B, T + n] ids (prompt, then new tokens, then pad), or a GenerateOutput with `return_dict`.
    `compile=True` runs plain decoding steps through `torch.compile` (inference/compiled.py; the same
    tokens; eager fallback with a warning when it cannot), and with `speculative` a batch-1 row's drafts and
    verification as one compiled graph per step; None = the process default (`--compile`).
    """
    options.pop("use_cache", None)  # always on; accepted for transformers compatibility
    max_length = options.pop("max_length", None)
    params = SamplingParams.from_kwargs(**options)
    ids, am = prepare_inputs(model, input_ids, attention_mask)
    if max_length is not None and "max_new_tokens" not in options:
        params = params.replace(max_new_tokens=max(1, int(max_length) - ids.shape[1]))
    params.validate(model.config.vocab_size)
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer: pass tokenizer=...")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise GenerationError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    check_context(model, am, params.max_new_tokens)
    pad = pad_id(model.config) if pad_token_id is None else int(pad_token_id)
    stats: dict = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if num_beams > 1:
                states = beam_search(model, ids, am, params, num_beams, length_penalty, early_stopping,
                                     tokenizer, cache_mode)
            elif speculative:
                states, stats = speculative_decode(model, ids, am, params, tokenizer, cache_mode,
                                                   num_speculative_tokens, compile)
            else:
                states = None
                for *_, states in decode_steps(model, ids, am, params, tokenizer, cache_mode, compile):
                    pass
    finally:
        model.train(was_training)
    n = max(len(s.tokens) for s in states)
    new = torch.full((ids.shape[0], n), pad, dtype=torch.long, device=ids.device)
    for r, s in enumerate(states):
        new[r, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
    seq = torch.cat([ids, new], dim=1)
    if not return_dict:
        return seq
    texts = [s.text for s in states] if tokenizer is not None else None
    return GenerateOutput(seq, [s.tokens for s in states], [s.finish_reason for s in states], texts, stats)


def stream(model, tokenizer, prompt: str | Sequence[int], info: dict | None = None, **options) -> Iterator[str]:
    """Generate from one prompt (text or ids) and yield text pieces as they become complete.

    Pieces never split a UTF-8 character and never contain (part of) a stop string; "".join(pieces)
    equals `generate_text(...)` with the same options and seed. `info`, if given, receives
    `new_tokens`, `token_ids` and `finish_reason` when the stream ends.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise GenerationError("empty prompt: give at least one token")
    cache_mode = options.pop("cache_mode", "latent")
    compile = options.pop("compile", None)
    params = SamplingParams.from_kwargs(**options).validate(model.config.vocab_size)
    x, am = prepare_inputs(model, [ids])
    check_context(model, am, params.max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, _, piece, states in decode_steps(model, x, am, params, tokenizer, cache_mode, compile):
                if piece:
                    yield piece
            if info is not None:
                info.update(new_tokens=len(states[0].tokens), token_ids=list(states[0].tokens),
                            finish_reason=states[0].finish_reason)
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, prompt: str | Sequence[int], **options) -> str:
    """The generated text for one prompt (special tokens skipped, cut before the first stop string)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise GenerationError("empty prompt: give at least one token")
    out = generate(model, [ids], tokenizer=tokenizer, return_dict=True, **options)
    return out.texts[0]
