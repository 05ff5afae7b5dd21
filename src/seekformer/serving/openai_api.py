"""/v1/completions, /v1/chat/completions, /v1/embeddings: request -> sequences for the backend -> OpenAI
responses.

`OpenAIHandlers` turns a validated request into `Sequence`s (one per prompt and per `n`), submits them
and builds either one JSON response or a stream of server-sent events (chunks, then `[DONE]`). It checks
everything a user can get wrong before any work starts: the model name, empty or too long prompts,
`max_tokens` < 1 or beyond the context, token ids outside the vocabulary, unsupported parameters.

Cheap checks come first: the number of sequences, then the prompt length in characters (a text longer
than `context x longest token` characters cannot fit the context, whatever it tokenizes to), and only
then tokenization, which runs in a worker thread so the event loop (and /health) keeps answering. A
non-streaming request whose client disconnects is cancelled, as a stream is.
"""

from __future__ import annotations

import base64
import codecs
import json
import time
import uuid
from dataclasses import dataclass, field

import anyio

from ..errors import SeekformerError
from ..inference.sampling import SamplingParams
from .backend import Backend, QueueFull, Sequence, ShuttingDown
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from .tools import chat_messages, plan_chat

DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streaming request checks that its client is still there
TOKENIZE_THREADS = 4  # tokenizations running at once (off the event loop)


class JSONText(str):
    """A response body already serialised to JSON (large answers are built off the event loop)."""


@dataclass
class _Choice:
    """What one sequence produced so far."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_scores: object = None
    embedding: object = None

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
        self.end_of_turn = tuple(getattr(tokenizer, "end_of_turn_token_ids", ()))
        self.hidden_size = cfg.hidden_size
        self._text_cache: dict[int, str] = {}
        self.max_prompt_chars = self.context * self._longest_token()
        self._tokenize_limiter = anyio.CapacityLimiter(TOKENIZE_THREADS)
        self.vision = None  # a serving.vision.VisionChat when the model reads images

    def _longest_token(self) -> int:
        """Characters of the longest token (special tokens included): a text of more than context x this
        many characters has more tokens than the context holds."""
        if hasattr(self.tok, "token_bytes"):
            longest = max(len(self.tok.token_bytes(i)) for i in range(self.vocab))
        else:
            longest = 64
        specials = getattr(self.tok, "special_token_ids", {})
        return max([longest, 1] + [len(name) for name in specials])

    # ------------------------------------------------------------------ tokenizing (off the event loop)
    def _check_chars(self, texts, param: str) -> None:
        n = sum(len(t) for t in texts)
        if n > self.max_prompt_chars:
            raise bad_request(f"the prompt is {n} characters, more than the model context ({self.context} tokens) "
                              "can hold: shorten it", param, "context_length_exceeded")

    async def in_thread(self, fn, *args):
        """`fn(*args)` in a worker thread (tokenizing, scoring): the event loop keeps answering
        meanwhile; at most a few run at once (a shared limiter)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._tokenize_limiter)

    async def encode_texts(self, texts: list[str], param: str = "prompt", **kw) -> list[list[int]]:
        """Token ids of each text, after the character bound, in a worker thread."""
        for t in texts:
            self._check_chars([t], param)
        return await self.in_thread(lambda: [self.tok.encode(t, **kw) for t in texts])

    def _check_count(self, n: int) -> None:
        if n > self.backend.capacity:
            raise bad_request(f"the request asks for {n} sequences (prompts x n); this server takes at most "
                              f"{self.backend.capacity} at once", "n")

    # ------------------------------------------------------------------ checks and inputs
    def check_model(self, name: str) -> None:
        """404 (`model_not_found`) unless `name` is the served model's name."""
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
            ignore_eos=req.ignore_eos, logprobs=logprobs, speculative=req.speculative)
        if req.speculative and not self.backend.speculative_available:
            raise bad_request("speculative decoding is not available: the model has no MTP modules "
                              "(num_nextn_predict_layers = 0) or the server runs with --no-speculative", "speculative")
        try:
            return params.validate(self.vocab)
        except SeekformerError as e:
            raise bad_request(str(e)) from None

    def _submit(self, seqs: list[Sequence], prompt_tokens: int):
        self._check_count(len(seqs))
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
        return params if params.seed is None or j == 0 else params.replace(seed=(params.seed + j) % 2 ** 64)

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
    async def completions(self, req: CompletionRequest, is_disconnected=None):
        """POST /v1/completions: a JSON body, or server-sent events when `req.stream`. Prompts are
        strings or token ids; `echo` / `logprobs` score the prompt in chunks between decode steps;
        `is_disconnected()` (async) is polled so a dropped client cancels its sequences."""
        self.check_model(req.model)
        req.check_unsupported()
        stop, include_usage = req.stop_list(), req.include_usage()
        p = req.prompt
        self._check_count((1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)) * req.n)
        if isinstance(p, str) or (p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else list(p)
            prompts = await self.encode_texts(texts)
        else:
            prompts = [list(p)] if p and isinstance(p[0], int) else [list(x) for x in p]
            texts = None
        if not prompts:
            raise bad_request("the prompt is empty: give a string, a list of strings or token ids", "prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            self._check_prompt(ids, max_tokens, "prompt")
        if texts is None and req.echo:
            texts = await self.in_thread(lambda: [self.tok.decode(ids, skip_special_tokens=False)
                                                   for ids in prompts])
        params = self._params(req, max_tokens, req.logprobs, stop)
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        seqs = [Sequence(ids, self._seeded(params, j), echo_lp) for ids in prompts for j in range(req.n)]
        prompt_tokens = sum(map(len, prompts))
        sub = self._submit(seqs, prompt_tokens * req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [texts[i // req.n] if req.echo else "" for i in range(len(seqs))]
        if req.stream:
            return self._stream_completion(sub, rid, created, echo, req.logprobs, prompt_tokens, include_usage)
        choices = await self._collect(sub, is_disconnected)

        def build() -> dict:
            out = []
            for i, c in enumerate(choices):
                lp = self._completion_logprobs(c, sub.sequences[i], echo[i], req.logprobs) \
                    if req.logprobs is not None else None
                out.append({"index": i, "text": echo[i] + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": out, "usage": self._usage(prompt_tokens, choices)}

        if req.logprobs is None:
            return build()
        return JSONText(await self.in_thread(lambda: json.dumps(build())))  # big: built off the event loop

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
    async def chat(self, req: ChatCompletionRequest, is_disconnected=None):
        """POST /v1/chat/completions: the messages through the model's chat template; tools and
        `response_format` constrain the output (serving/tools.py); image parts go to serving/vision.py.
        A JSON body, or server-sent events when `req.stream`; a dropped client cancels its sequences."""
        self.check_model(req.model)
        req.check_unsupported()
        from .vision import has_images, refuse_text_only

        if has_images(req):  # image_url parts: serving/vision.py
            if self.vision is None:
                refuse_text_only(req, self.model_name)
            return await self.vision.chat(req)
        stop, include_usage = req.stop_list(), req.include_usage()
        plan = plan_chat(req, self.tok, self.vocab, self._chat_stop_ids())
        messages = chat_messages(req.messages)
        self._check_count(req.n)
        self._check_chars([m["content"] or "" for m in messages], "messages")
        ids = await self.in_thread(lambda: self._chat_prompt_ids(messages, plan.tools))
        limit = req.limit()
        max_tokens = self.context - len(ids) if limit is None else limit
        self._check_prompt(ids, max_tokens, "messages")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, top_n, stop, self.end_of_turn)
        seqs = [Sequence(ids, plan.params_for(self._seeded(params, j))) for j in range(req.n)]
        sub = self._submit(seqs, len(ids) * req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            if plan.buffers:
                return self._stream_planned_chat(sub, rid, created, top_n, len(ids), include_usage, plan)
            return self._stream_chat(sub, rid, created, top_n, len(ids), include_usage)
        choices = await self._collect(sub, is_disconnected)
        out = []
        for i, c in enumerate(choices):
            message, finish = plan.message(c.text, c.finish_reason)
            out.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": self._chat_logprobs(c.tokens, c.logprobs, c.top, top_n)
                        if top_n is not None else None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(len(ids), choices)}

    def _chat_stop_ids(self) -> tuple[int, ...]:
        """eos and the chat template's end-of-turn tokens: where a (constrained) reply may end."""
        eos = self.backend.model.config.eos_token_id
        return tuple(dict.fromkeys(([eos] if eos is not None else []) + list(self.end_of_turn)))

    async def _stream_planned_chat(self, sub, rid, created, top_n, prompt_tokens, include_usage, plan):
        """A chat stream whose replies may be tool calls: each choice is sent whole when it finishes (a role
        chunk first), as `tool_calls` or as content."""
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        usage = {"usage": None} if include_usage else {}
        choices = [_Choice() for _ in sub.sequences]
        try:
            for i in range(len(choices)):
                yield json.dumps({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}], **usage})
            async for items in sub.batches():
                for kind, i, payload in items:
                    if kind == "error":
                        yield json.dumps(self._error_body(payload))
                        return
                    c = choices[i]
                    c.add(payload)
                    if c.finish_reason is None:
                        continue
                    message, finish = plan.message(c.text, c.finish_reason)
                    delta = {"content": message["content"]} if message.get("content") is not None else {
                        "tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
                    lp = self._chat_logprobs(c.tokens, c.logprobs, c.top, top_n) if top_n is not None else None
                    yield json.dumps({**base, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                                           "finish_reason": finish}], **usage})
            if include_usage:
                yield json.dumps({**base, "choices": [], "usage": self._usage(prompt_tokens, choices)})
            yield "[DONE]"
        finally:
            sub.cancel()

    def _chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The conversation rendered with the tokenizer's chat template; template errors are 400s."""
        try:
            return self.tok.chat_ids(messages, add_generation_prompt=True, tools=tools)
        except SeekformerError as e:
            raise bad_request(str(e), "messages") from None

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
    async def _collect(self, sub, is_disconnected=None) -> list[_Choice]:
        """Every item of a non-streaming request; `is_disconnected` (async, the HTTP request's) is polled
        meanwhile and cancels the sequences when the client has gone."""
        choices = [_Choice() for _ in sub.sequences]
        error: APIError | None = None

        async def watch():
            while not await is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_SECONDS)
            sub.cancel()

        try:
            async with anyio.create_task_group() as tg:
                if is_disconnected is not None:
                    tg.start_soon(watch)
                async for kind, i, payload in sub:
                    if kind == "error":
                        error = self._as_api_error(payload)
                        break
                    if kind == "prompt":
                        choices[i].prompt_scores = payload
                    elif kind == "embedding":
                        choices[i].embedding = payload
                    else:
                        choices[i].add(payload)
                tg.cancel_scope.cancel()
        finally:
            sub.cancel()
        if error is not None:
            raise error
        return choices

    # ------------------------------------------------------------------ /v1/embeddings
    async def embeddings(self, req, is_disconnected=None) -> dict:
        """OpenAI embeddings: the final hidden states of each input, mean-pooled (or the last token's)."""
        self.check_model(req.model)
        if req.dimensions is not None and req.dimensions != self.hidden_size:
            raise bad_request(f"this model's embeddings have {self.hidden_size} dimensions; dimensions="
                              f"{req.dimensions} is not supported", "dimensions", "unsupported_parameter")
        x = req.input
        if isinstance(x, str) or (x and isinstance(x[0], int)):
            x = [x]
        if not x:
            raise bad_request("the input is empty: give a string, a list of strings or token ids", "input")
        self._check_count(len(x))
        if isinstance(x[0], str):
            prompts = await self.encode_texts(list(x), "input")
        else:
            prompts = [list(ids) for ids in x]
        for ids in prompts:
            if not ids:
                raise bad_request("an input is empty: give at least one token", "input")
            if any(i < 0 or i >= self.vocab for i in ids):
                raise bad_request(f"input token ids must be in [0, {self.vocab})", "input")
            if len(ids) > self.context:
                raise bad_request(f"an input is {len(ids)} tokens but the model context is {self.context}: "
                                  "shorten it", "input", "context_length_exceeded")
        total = sum(map(len, prompts))
        sub = self._submit([Sequence(ids, embed=req.pooling) for ids in prompts], total)
        choices = await self._collect(sub, is_disconnected)

        def build() -> str:
            data = []
            for i, c in enumerate(choices):
                vec = c.embedding.numpy().astype("<f4")
                emb = base64.b64encode(vec.tobytes()).decode() if req.encoding_format == "base64" else vec.tolist()
                data.append({"object": "embedding", "index": i, "embedding": emb})
            return json.dumps({"object": "list", "data": data, "model": self.model_name,
                               "usage": {"prompt_tokens": total, "total_tokens": total}})

        return JSONText(await self.in_thread(build))

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

