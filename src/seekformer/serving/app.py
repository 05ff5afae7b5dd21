"""The FastAPI application behind `seekformer serve`.

    app = create_app(model, tokenizer, ServerConfig(model_name="my-model", api_key="sk-..."))

Routes: GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings
(OpenAI-compatible); GET /tokenizer_info, POST /tokenize, POST /detokenize (vLLM-compatible:
lm-evaluation-harness' `local-completions` model tokenizes through them); GET /health; GET /metrics
(Prometheus, through prometheus-client).

Every error is an OpenAI-style JSON body {"error": {message, type, param, code}}: 400 for invalid input
(malformed JSON, wrong types, out-of-range values, prompts too long, unsupported parameters), 401 for a
missing or wrong `Authorization: Bearer` key (when the server has one; /health and /metrics stay open),
404 for an unknown model or route, 413 for a body over `ServerConfig.max_body_bytes` (answered from the
Content-Length header, or as soon as that many bytes have arrived: before any parsing), 429 when the
queue is full, 503 while shutting down. A 500 is a bug. With `cors_origins`, browsers on those origins
may call the API (CORS).

Shutdown: uvicorn stops accepting connections and waits for open responses (streams included: their
shutdown grace period is `ServerConfig.shutdown_grace` seconds); then the backend drains and stops.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backend import Backend, release_memory
from .limits import DEFAULT_MAX_BODY_BYTES
from .metrics import ServerMetrics
from .openai_api import JSONText, OpenAIHandlers
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       TokenizeRequest)

KNOWN_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/tokenize",
                   "/detokenize", "/tokenizer_info", "/health", "/metrics")
BIG_BODY_BYTES = 2 ** 20  # after a body this large, freed memory is handed back to the OS


@dataclass
class ServerConfig:
    """How the server runs. `api_key` None: no authentication."""

    model_name: str = "seekformer"
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 256
    shutdown_grace: float = 600.0  # seconds a stream may still run after shutdown starts
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413; None: no limit
    cors_origins: list[str] = field(default_factory=list)  # origins allowed to call from a browser ("*": any)
    prefill_chunk: int = 512  # prompt tokens encoded between two decode steps (chunked prefill and scoring)
    # MTP self-speculative decoding (Engine's `speculative`): True = requests speculate by default,
    # None = requests that ask ("speculative": true), False = off
    speculative: bool | None = None
    speculative_tokens: int | None = None  # drafts per speculative step (None: the MTP depth)
    vision: Any = None  # a SeekForVisionLM sharing `model`: image_url content parts (serving/vision.py)
    vision_options: Any = None  # serving.vision.VisionOptions (remote URLs, byte and pixel limits)


def _error(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal"}


def _param_path(loc) -> list[str]:
    """A pydantic error location without "body" and without union member tags ("str", "list[int]")."""
    out = []
    for x in loc:
        if x == "body":
            continue
        if isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "(" in x):
            break
        out.append(str(x))
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem of a request body that failed validation."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})", None
    path = _param_path(err.get("loc", ()))
    if not path and err.get("type") == "missing":
        return "the request body is empty: send a JSON object (Content-Type: application/json)", None
    if not path and err.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (sent with Content-Type: application/json)", None
    param = ".".join(path) or None
    same = [e for e in errors if _param_path(e.get("loc", ())) == path]
    if len(same) > 1:  # a union: none of the accepted types matched
        return f"invalid value for '{param}': wrong type ({'; '.join(e.get('msg', '') for e in same[:4])})", param
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"invalid value for '{param}': {err.get('msg')}{extra}", param


class _TooLarge(StarletteHTTPException):
    """A body over the limit, found while receiving (an HTTPException, so FastAPI's body parsing lets it
    through to the JSON error handlers)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(f"more than {limit}", limit))


def _too_large_message(size: str, limit: int) -> str:
    return f"the request body is {size} bytes, over this server's limit of {limit} bytes (seekformer serve " \
           "--max-body-bytes)"


class _BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a body over `limit` bytes, before anything reads or parses it (from
    Content-Length when the client sends one, else as soon as the limit is passed while receiving)."""

    def __init__(self, app, limit: int | None) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps(APIError(413, _too_large_message(size, self.limit), None, "request_too_large").body()
                          ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, declared.decode())
        received, started = [0], [False]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:  # raised outside FastAPI's handlers
            if not started[0]:
                await self._refuse(send, f"more than {self.limit}")
        finally:
            if received[0] >= BIG_BODY_BYTES:
                release_memory()


class _MetricsMiddleware:
    """Pure ASGI middleware: counts responses by endpoint and status, times them to their last byte."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        start, status = time.perf_counter(), [500]

        async def wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
                self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, wrapped)


def create_app(model, tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """An app serving `model` (a SeekForCausalLM) with `tokenizer` (a SeekTokenizer)."""
    config = config or ServerConfig()
    backend = Backend(model, tokenizer, config.max_batch_size, config.max_queue, config.prefill_chunk,
                      config.speculative, config.speculative_tokens)
    metrics = ServerMetrics(lambda: backend.waiting, lambda: backend.running)
    backend.on_tokens = metrics.generation_tokens.inc
    backend.on_first_token = metrics.ttft.observe
    handlers = OpenAIHandlers(backend, tokenizer, config.model_name, metrics)
    if config.vision is not None:
        from .vision import VisionChat

        handlers.vision = VisionChat(handlers, config.vision, config.vision_options)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(backend.close)

    app = FastAPI(title="seekformer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend, app.state.metrics, app.state.config = backend, metrics, config
    app.add_middleware(_BodyLimitMiddleware, limit=config.max_body_bytes)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_origins)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: counts 413s and CORS answers too

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return _error(APIError(400, msg, param, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = (f"no route {request.method} {request.url.path} "
                   "(see /v1/models, /v1/completions, /v1/chat/completions)")
        return _error(APIError(exc.status_code, msg, None, "request_too_large" if exc.status_code == 413 else None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # pragma: no cover - only on bugs
        return _error(APIError(500, f"internal server error: {type(exc).__name__}: {exc}", None, "internal_error"))

    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", None, "invalid_api_key")

    auth = [Depends(authorize)]

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "seekformer",
                "max_model_len": handlers.context}

    @app.get("/health")
    async def health():
        if not backend.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "running": backend.running, "waiting": backend.waiting}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str):
        handlers.check_model(model_id)
        return model_card()

    def respond(result):
        if isinstance(result, JSONText):
            return Response(result, media_type="application/json")
        if isinstance(result, dict):
            return JSONResponse(result)
        return EventSourceResponse(result, ping=15, shutdown_event=anyio.Event(),
                                   shutdown_grace_period=config.shutdown_grace)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        return respond(await handlers.completions(req, request.is_disconnected))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return respond(await handlers.chat(req, request.is_disconnected))

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(req: EmbeddingRequest, request: Request):
        return respond(await handlers.embeddings(req, request.is_disconnected))

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        return {"eos_token": tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False),
                "bos_token": tokenizer.decode([tokenizer.bos_token_id], skip_special_tokens=False),
                "pad_token": tokenizer.decode([tokenizer.pad_token_id], skip_special_tokens=False),
                "chat_template": tokenizer.chat_template, "model_max_length": handlers.context,
                "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(req: TokenizeRequest):
        if req.model is not None:
            handlers.check_model(req.model)
        ids = await handlers.in_thread(lambda: tokenizer.encode(req.prompt, add_bos=req.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": handlers.context}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(req: DetokenizeRequest):
        if any(not 0 <= t < tokenizer.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", "tokens", "invalid_value")
        return {"prompt": await handlers.in_thread(lambda: tokenizer.decode(req.tokens, skip_special_tokens=False))}

    from .playground import add_playground  # GET / (the web playground) and POST /v1/inspect

    add_playground(app, model, tokenizer, handlers.context, auth)
    return app

