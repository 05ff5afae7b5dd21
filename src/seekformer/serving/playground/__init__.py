"""The web playground at `/` and the routing/attention endpoint POST /v1/inspect.

    add_playground(app, model, tokenizer, context, auth)   # called once by serving.app.create_app

GET / serves one static page (index.html + playground.js + playground.css, shipped in this package: no
CDN, works offline). The page talks only to this server: /v1/models, /v1/completions or
/v1/chat/completions (streamed) and POST /v1/inspect, sending the API key it is given.

POST /v1/inspect {"prompt": str | "messages": [{role, content}] | "token_ids": [int], "add_bos": false,
"attention": "full" | "mean_u8" | "none", "layers": [int] | null} -> the record of
`seekformer.interpret.report.inspect_prompt` (tokens, per MoE layer experts and gate weights per token,
attention). `messages` are formatted with the chat template (no generation prompt: send the reply as the
last assistant message). Errors are 400 JSON (empty or too long input, unknown layer, bad token ids),
401 without the key when the server has one. A dense model answers `layers: []` and says so in `note`.
"""

from __future__ import annotations

import threading
from importlib import resources
from typing import Literal, Union

import anyio
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ...interpret.capture import InspectError
from ...interpret.report import inspect_prompt
from ..protocol import APIError, ChatMessage

STATIC = {"playground.js": "text/javascript", "playground.css": "text/css"}


class InspectRequest(BaseModel):
    """POST /v1/inspect (the playground): a prompt and what to capture for it (routing, attention)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    token_ids: list[StrictInt] | None = None
    add_bos: StrictBool = False
    attention: Literal["full", "mean_u8", "none"] = "full"
    layers: Union[list[StrictInt], None] = Field(None, max_length=1024)


def _static(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def add_playground(app: FastAPI, model, tokenizer, context: int, auth: list[Depends]) -> None:
    """Register GET /, GET /playground/{file} and POST /v1/inspect on `app`."""
    lock = threading.Lock()  # one inspection at a time: it runs a full forward beside the decoding engine

    @app.get("/", include_in_schema=False)
    async def playground_page():
        return HTMLResponse(_static("index.html"))

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str):
        if name not in STATIC:
            raise APIError(404, f"no playground file {name!r}", None, None)
        return Response(_static(name), media_type=STATIC[name])

    def token_ids(req: InspectRequest) -> list[int]:
        given = [x is not None for x in (req.prompt, req.messages, req.token_ids)]
        if sum(given) != 1:
            raise APIError(400, "give exactly one of 'prompt', 'messages' or 'token_ids'", None, "invalid_value")
        if req.token_ids is not None:
            if any(not 0 <= t < tokenizer.vocab_size for t in req.token_ids):
                raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", "token_ids", "invalid_value")
            return list(req.token_ids)
        if req.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            return tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=False))
        return tokenizer.encode(req.prompt, add_bos=req.add_bos)

    def run(req: InspectRequest) -> dict:
        ids = token_ids(req)
        if len(ids) > context:
            raise APIError(400, f"the input is {len(ids)} tokens but the model context is {context}: shorten it",
                           "prompt", "context_length_exceeded")
        with lock:
            try:
                return inspect_prompt(model, tokenizer, ids, attention=req.attention != "none", layers=req.layers,
                                      attention_format=req.attention)
            except InspectError as e:
                raise APIError(400, str(e), "layers" if "layer" in str(e) else "prompt", "invalid_value") from None

    @app.post("/v1/inspect", dependencies=auth)
    async def inspect_endpoint(req: InspectRequest):
        return await anyio.to_thread.run_sync(run, req)
