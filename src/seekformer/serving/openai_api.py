"""/v1/completions and /v1/chat/completions: request -> sequences for the backend -> OpenAI responses.

`OpenAIHandlers` turns a validated request into `Sequence`s (one per prompt and per `n`), submits them
and builds either one JSON response or a stream of server-sent events (chunks, then `[DONE]`). It checks
everything a user can get wrong before any work starts: the model name, empty or too long prompts,
`max_tokens` < 1 or beyond the context, token ids outside the vocabulary, unsupported parameters.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass, field

from ..errors import SeekformerError
from ..inference.sampling import SamplingParams
from ..tokenizer import END_OF_TURN
from .backend import Backend, QueueFull, Sequence, ShuttingDown
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class _Choice:
    """What one sequence produced so far."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_scores: object = None

    def add(self, ev) -> None:
        if ev.token_id is not None:
            self.tokens.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.top.append(ev.top_logprobs)
        self.text += ev.text
        if ev.finish_reason is not None:
            self.finish_reason = "length" if ev.finish_reason == "length" else "stop"


class _Offsets:
    """Character positions of tokens in the text they decode to, across calls (a stream's chunks).

    Bytes go through an incremental UTF-8 decoder, so a character split over tokens counts once; special
    tokens count their text in an echoed prompt and nothing in generated text (which skips them).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.special = set(getattr(tokenizer, "special_token_ids", {}).values())
        self.chars = 0
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids, specials_in_text: bool) -> list[int]:
        out = []
        for t in ids:
            out.append(self.chars)
            if t in self.special and not specials_in_text:
                continue
            raw = self.tok.token_bytes(t) if hasattr(self.tok, "token_bytes") else \
                self.tok.decode([t], skip_special_tokens=False).encode("utf-8")
            self.chars += len(self.utf8.decode(raw))
        return out


class OpenAIHandlers:
    """Builds sequences, submits them to the backend and formats the answers."""

    def __init__(self, backend: Backend, tokenizer, model_name: str, metrics=None) -> None:
        self.backend = backend
        self.tok = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        cfg = backend.model.config
        self.context = cfg.max_position_embeddings
        self.vocab = cfg.vocab_size
        self.end_of_turn = getattr(tokenizer, "special_token_ids", {}).get(END_OF_TURN)
        self._text_cache: dict[int, str] = {}
        self.vision = None  # a serving.vision.VisionChat when the model reads images

    # ------------------------------------------------------------------ checks and inputs
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}' "
                                "(see GET /v1/models)", "model", "model_not_found")

    def _check_prompt(self, ids: list[int], max_tokens: int, param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty: give at least one token", param)
        if any(i < 0 or i >= self.vocab for i in ids):
            raise bad_request(f"prompt token ids must be in [0, {self.vocab})", param)
        if len(ids) >= self.context:
            raise bad_request(f"the prompt is {len(ids)} tokens but the model context is {self.context}: shorten it",
                              param, "context_length_exceeded")
        if max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if len(ids) + max_tokens > self.context:
            raise bad_request(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model "
                              f"context ({self.context}): ask for at most {self.context - len(ids)} tokens",
                              "max_tokens", "context_length_exceeded")

    def _params(self, req, max_tokens: int, logprobs: int | None, stop: list[str], extra_stop_ids=()) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
        params = SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=req.min_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0, top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k, min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
            frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
            seed=req.seed, stop=tuple(stop), stop_token_ids=tuple(req.stop_token_ids or ()) + tuple(extra_stop_ids),
            ignore_eos=req.ignore_eos, logprobs=logprobs)
        try:
            return params.validate(self.vocab)
        except SeekformerError as e:
            raise bad_request(str(e)) from None

    def _submit(self, seqs: list[Sequence], prompt_tokens: int):
        if len(seqs) > self.backend.capacity:
            raise bad_request(f"the request asks for {len(seqs)} sequences (prompts x n); this server takes at most "
                              f"{self.backend.capacity} at once", "n")
        try:
            sub = self.backend.submit(seqs)
        except QueueFull as e:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise APIError(429, str(e), None, "queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), None, "shutting_down") from None
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(prompt_tokens)
        return sub

    def _seeded(self, params: SamplingParams, j: int) -> SamplingParams:
        return params if params.seed is None or j == 0 else params.replace(seed=params.seed + j)

    # ------------------------------------------------------------------ token text
    def token_text(self, token_id: int) -> str:
        """A token as text; a token that is not complete UTF-8 becomes "bytes:\\xNN..." (as OpenAI does)."""
        text = self._text_cache.get(token_id)
        if text is None:
            if hasattr(self.tok, "token_bytes"):
                raw = self.tok.token_bytes(token_id)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            else:
                text = self.tok.decode([token_id], skip_special_tokens=False)
            self._text_cache[token_id] = text
        return text

    def _token_bytes(self, token_id: int) -> list[int]:
        if hasattr(self.tok, "token_bytes"):
            return list(self.tok.token_bytes(token_id))
        return list(self.token_text(token_id).encode("utf-8"))

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, req: CompletionRequest):
        self.check_model(req.model)
        req.check_unsupported()
        stop, include_usage = req.stop_list(), req.include_usage()
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else list(p)
            prompts = [self.tok.encode(t) for t in texts]
        else:
            prompts = [list(p)] if p and isinstance(p[0], int) else [list(x) for x in p]
            texts = None
        if not prompts:
            raise bad_request("the prompt is empty: give a string, a list of strings or token ids", "prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            self._check_prompt(ids, max_tokens, "prompt")
        if texts is None:
            texts = [self.tok.decode(ids, skip_special_tokens=False) for ids in prompts]
        params = self._params(req, max_tokens, req.logprobs, stop)
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        seqs = [Sequence(ids, self._seeded(params, j), echo_lp) for ids in prompts for j in range(req.n)]
        prompt_tokens = sum(map(len, prompts))
        sub = self._submit(seqs, prompt_tokens * req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [texts[i // req.n] if req.echo else "" for i in range(len(seqs))]
        if req.stream:
            return self._stream_completion(sub, rid, created, echo, req.logprobs, prompt_tokens, include_usage)
        choices = await self._collect(sub)
        out = []
        for i, c in enumerate(choices):
            lp = self._completion_logprobs(c, sub.sequences[i], echo[i], req.logprobs) if req.logprobs is not None \
                else None
            out.append({"index": i, "text": echo[i] + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(prompt_tokens, choices)}

    def _completion_logprobs(self, c: _Choice, seq: Sequence, echo: str, top_n: int,
                             offsets: _Offsets | None = None) -> dict:
        """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset
        (`offsets` carries the character position on from earlier chunks of a stream)."""
        offsets = offsets or _Offsets(self.tok)
        ids: list[int] = []
        lps: list[float | None] = []
        tops: list[dict | None] = []
        text_offset: list[int] = []
        if echo and c.prompt_scores is not None:
            s = c.prompt_scores
            ids += list(seq.prompt_ids)
            lps += [None] + s.logprobs.tolist()
            tops += [None] + [self._top_dict(zip(ti, tv), top_n) for ti, tv in
                              zip(s.top_ids.tolist(), s.top_logprobs.tolist())]
            text_offset += offsets.feed(seq.prompt_ids, specials_in_text=True)
        ids += c.tokens
        lps += c.logprobs
        tops += [self._top_dict(t or [], top_n) for t in c.top]
        text_offset += offsets.feed(c.tokens, specials_in_text=False)
        return {"tokens": [self.token_text(i) for i in ids], "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": text_offset}

    def _top_dict(self, pairs, top_n: int) -> dict:
        out: dict[str, float] = {}
        for tid, lp in list(pairs)[:top_n]:
            key = self.token_text(int(tid))
            out[key] = max(lp, out.get(key, float("-inf")))
        return out

    async def _stream_completion(self, sub, rid, created, echo, top_n, prompt_tokens, include_usage):
        choices = [_Choice() for _ in sub.sequences]
        offsets = [_Offsets(self.tok) for _ in choices]
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        usage = {"usage": None} if include_usage else {}
        try:
            if any(echo) and top_n is None:
                for i, e in enumerate(echo):
                    yield json.dumps({**base, "choices": [{"index": i, "text": e, "logprobs": None,
                                                           "finish_reason": None}], **usage})
            async for items in sub.batches():
                touched: dict[int, tuple[int, int]] = {}  # choice -> (tokens, text length) before this batch
                for kind, i, payload in items:
                    c = choices[i]
                    if kind == "error":
                        yield json.dumps(self._error_body(payload))
                        return
                    if kind == "prompt":
                        c.prompt_scores = payload
                        lp = self._completion_logprobs(c, sub.sequences[i], echo[i], top_n, offsets[i])
                        yield json.dumps({**base, "choices": [{"index": i, "text": echo[i], "logprobs": lp,
                                                               "finish_reason": None}], **usage})
                        c.prompt_scores = None
                        continue
                    touched.setdefault(i, (len(c.tokens), len(c.text)))
                    c.add(payload)
                for i, (before, text_before) in touched.items():  # tokens that queued up go out as one chunk
                    c = choices[i]
                    text, lp = c.text[text_before:], None
                    if top_n is not None:
                        part = _Choice(c.tokens[before:], "", c.logprobs[before:], c.top[before:])
                        lp = self._completion_logprobs(part, sub.sequences[i], "", top_n, offsets[i])
                    if text or lp is not None or c.finish_reason:
                        yield json.dumps({**base, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                               "finish_reason": c.finish_reason}], **usage})
            if include_usage:
                yield json.dumps({**base, "choices": [], "usage": self._usage(prompt_tokens, choices)})
            yield "[DONE]"
        finally:
            sub.cancel()

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, req: ChatCompletionRequest):
        self.check_model(req.model)
        req.check_unsupported()
        from .vision import has_images, refuse_text_only

        if has_images(req):  # image_url parts: serving/vision.py
            if self.vision is None:
                refuse_text_only(req, self.model_name)
            return await self.vision.chat(req)
        stop, include_usage = req.stop_list(), req.include_usage()
        messages = []
        for k, m in enumerate(req.messages):
            role = CHAT_ROLES.get(m.role)
            if role is None:
                raise bad_request(f"messages[{k}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}",
                                  f"messages.{k}.role")
            messages.append({"role": role, "content": m.text()})
        ids = self.tok.encode(self.tok.apply_chat_template(messages, add_generation_prompt=True))
        limit = req.limit()
        max_tokens = self.context - len(ids) if limit is None else limit
        self._check_prompt(ids, max_tokens, "messages")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        extra = (self.end_of_turn,) if self.end_of_turn is not None else ()
        params = self._params(req, max_tokens, top_n, stop, extra)
        seqs = [Sequence(ids, self._seeded(params, j)) for j in range(req.n)]
        sub = self._submit(seqs, len(ids) * req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return self._stream_chat(sub, rid, created, top_n, len(ids), include_usage)
        choices = await self._collect(sub)
        out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": self._chat_logprobs(c.tokens, c.logprobs, c.top, top_n) if top_n is not None else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(len(ids), choices)}

    def _chat_logprobs(self, tokens, logprobs, tops, top_n) -> dict:
        def entry(tid, lp):
            return {"token": self.token_text(tid), "logprob": lp, "bytes": self._token_bytes(tid)}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(int(a), b) for a, b in (top or [])[:top_n]]}
                            for t, lp, top in zip(tokens, logprobs, tops)]}

    async def _stream_chat(self, sub, rid, created, top_n, prompt_tokens, include_usage):
        choices = [_Choice() for _ in sub.sequences]
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        usage = {"usage": None} if include_usage else {}
        try:
            for i in range(len(choices)):
                yield json.dumps({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}], **usage})
            async for items in sub.batches():
                touched: dict[int, tuple[int, int]] = {}
                for kind, i, payload in items:
                    if kind == "error":
                        yield json.dumps(self._error_body(payload))
                        return
                    c = choices[i]
                    touched.setdefault(i, (len(c.tokens), len(c.text)))
                    c.add(payload)
                for i, (before, text_before) in touched.items():  # tokens that queued up go out as one chunk
                    c = choices[i]
                    text, lp = c.text[text_before:], None
                    if top_n is not None and len(c.tokens) > before:
                        lp = self._chat_logprobs(c.tokens[before:], c.logprobs[before:], c.top[before:], top_n)
                    if text or lp is not None or c.finish_reason:
                        delta = {"content": text} if text or not c.finish_reason else {}
                        yield json.dumps({**base, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                                               "finish_reason": c.finish_reason}], **usage})
            if include_usage:
                yield json.dumps({**base, "choices": [], "usage": self._usage(prompt_tokens, choices)})
            yield "[DONE]"
        finally:
            sub.cancel()

    # ------------------------------------------------------------------ shared
    async def _collect(self, sub) -> list[_Choice]:
        choices = [_Choice() for _ in sub.sequences]
        try:
            async for kind, i, payload in sub:
                if kind == "error":
                    raise self._as_api_error(payload)
                if kind == "prompt":
                    choices[i].prompt_scores = payload
                else:
                    choices[i].add(payload)
        finally:
            sub.cancel()
        return choices

    def _usage(self, prompt_tokens: int, choices: list[_Choice]) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    @staticmethod
    def _as_api_error(e: Exception) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, SeekformerError):
            return bad_request(str(e))
        if isinstance(e, ShuttingDown):
            return APIError(503, str(e), None, "shutting_down")
        return APIError(500, f"internal error while generating: {type(e).__name__}: {e}", None, "internal_error")

    def _error_body(self, e: Exception) -> dict:
        return self._as_api_error(e).body()

