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
from ..nn.kv_cache import CACHE_MODES, KVCache
from .sampling import PenaltyState, SamplingParams, choose, make_generator
from .stopping import SequenceState, stop_ids


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict=True)` returns."""

    sequences: torch.Tensor  # [B, T + N]: prompts then new tokens, pad after the end
    new_tokens: list[list[int]]  # per row, the generated ids (eos / stop token included)
    finish_reasons: list[str]  # "stop" | "length"
    texts: list[str] | None = None  # per row, the generated text (with a tokenizer; stop strings cut)
    stats: dict = field(default_factory=dict)  # e.g. speculative acceptance rate


def prepare_inputs(model, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a tensor [B,T] or [T], a list of ids, or a list of id lists (left-padded here).

    Returns (input_ids [B,T], attention_mask [B,T]) on the model's device. Raises GenerationError for
    empty prompts and ids outside the vocabulary.
    """
    device = model.device
    pad = _pad_id(model.config)
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


def _pad_id(config) -> int:
    for i in (config.pad_token_id, config.eos_token_id, 0):
        if i is not None:
            return int(i)
    return 0


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


def _banned(states: Sequence[SequenceState], vocab: int, device) -> torch.Tensor | None:
    """[B,V] mask of stop ids for rows that have not reached min_new_tokens yet (None when none)."""
    rows = [i for i, s in enumerate(states) if len(s.tokens) < s.params.min_new_tokens]
    if not rows:
        return None
    mask = torch.zeros(len(states), vocab, dtype=torch.bool, device=device)
    for i in rows:
        mask[i, list(states[i].eos_ids)] = True
    return mask


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                 tokenizer=None, cache_mode: str = "latent") -> Iterator[tuple[int, int, str, list[SequenceState]]]:
    """The plain decoding loop (greedy or sampling) as an iterator of (row, token, text piece, states).

    input_ids / attention_mask [B,T]. One KV cache of B rows and T + max_new_tokens slots is allocated
    up front; finished rows are dropped from it.
    """
    cfg = model.config
    b, t = input_ids.shape
    eos = stop_ids(params, cfg.eos_token_id)
    states = [SequenceState(params, eos, tokenizer) for _ in range(b)]
    cache = new_cache(model, b, t + params.max_new_tokens, cache_mode)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)] if params.penalised else [[]] * b
    pen = PenaltyState.create(prompts, cfg.vocab_size, input_ids.device, active=params.penalised)
    gen = make_generator(params.seed, input_ids.device)
    logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    active = list(range(b))  # batch position -> original row
    while True:
        run = [states[r] for r in active]
        tok = choose(logits, [params] * len(active), pen, gen, _banned(run, cfg.vocab_size, logits.device))
        pen.update(tok)
        for r, token in zip(active, tok.tolist()):
            piece = states[r].append(token)
            yield r, token, piece, states
        keep = [i for i, r in enumerate(active) if not states[r].finished]
        if not keep:
            return
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=tok.device)
            cache.reorder(idx)
            pen.select(idx)
            tok = tok[idx]
            active = [active[i] for i in keep]
        logits = model.decode_step(tok[:, None], cache)


def generate(model, input_ids, attention_mask=None, *, tokenizer=None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, speculative: bool = False,
             num_speculative_tokens: int | None = None, cache_mode: str = "latent", pad_token_id: int | None = None,
             return_dict: bool = False, **options) -> torch.Tensor | GenerateOutput:
    """Decode continuations of `input_ids` [B,T] (left padding marked by `attention_mask`).

    options: SamplingParams fields (max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
    repetition/frequency/presence penalties, seed, stop, stop_token_ids, eos_token_id, ...).
    Returns [B, T + n] ids (prompt, then new tokens, then pad), or a GenerateOutput with `return_dict`.
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
    pad = _pad_id(model.config) if pad_token_id is None else int(pad_token_id)
    stats: dict = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if num_beams > 1:
                from .beam import beam_search

                states = beam_search(model, ids, am, params, num_beams, length_penalty, early_stopping,
                                     tokenizer, cache_mode)
            elif speculative:
                from .speculative import speculative_decode

                states, stats = speculative_decode(model, ids, am, params, tokenizer, cache_mode,
                                                   num_speculative_tokens)
            else:
                states = None
                for *_, states in decode_steps(model, ids, am, params, tokenizer, cache_mode):
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
    params = SamplingParams.from_kwargs(**options).validate(model.config.vocab_size)
    x, am = prepare_inputs(model, [ids])
    check_context(model, am, params.max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, _, piece, states in decode_steps(model, x, am, params, tokenizer, cache_mode):
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
