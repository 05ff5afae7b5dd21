"""The OpenAI wire format: request bodies (validated by pydantic, strict types) and error responses.

Requests accept the OpenAI fields seekformer implements, plus vLLM's common extras (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`). Unknown fields are ignored, as
vLLM does, so newer clients keep working; known fields with values seekformer cannot honour (a
`logit_bias`, `best_of != n`) are refused with a 400 naming the field. `tools`, `tool_choice` and
`response_format` (JSON mode, JSON schema) are handled by serving/tools.py.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_STOP_TOKEN_IDS = 64
MAX_INT32 = 2 ** 31 - 1
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what a torch.Generator takes (64 bits)


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The OpenAI error body: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 APIError about `param`."""
    return APIError(400, message, param, code)


class _Request(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: StrictStr
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None
    # vLLM extras
    top_k: StrictInt | None = Field(None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: StrictInt = Field(0, ge=0, le=MAX_INT32)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # seekformer extra: MTP self-speculative decoding for this request (null: the server's default)
    speculative: StrictBool | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop sequences are supported, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise bad_request("stop sequences must be non-empty strings", "stop")
        return stops

    def include_usage(self) -> bool:
        opts = self.stream_options or {}
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        return bool(opts.get("include_usage", False))

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: StrictInt | None = Field(16, le=MAX_INT32)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_unsupported(self) -> None:
        """400 for fields this server accepts in the schema but does not implement (best_of != n, suffix)."""
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (only best_of == n)", "best_of", "unsupported_parameter")
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported", "suffix", "unsupported_parameter")


class TextPart(BaseModel):
    """An OpenAI text content part of a chat message."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    """The `image_url` of an image part: an http(s) or data: URL."""

    model_config = ConfigDict(strict=True, extra="ignore")

    url: StrictStr
    detail: StrictStr | None = None


class ImagePart(BaseModel):
    """An OpenAI image content part (models with a vision tower: serving/vision.py)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    """One chat message: role, content (a string or text / image parts), and tool-call fields."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: StrictStr
    content: Union[StrictStr, list[Union[TextPart, ImagePart]], None] = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns that called tools
    tool_call_id: StrictStr | None = None  # role "tool": the call this result answers

    def text(self) -> str:
        """The message's text: the string content, or its text parts joined (image parts left out)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, le=MAX_INT32)
    max_completion_tokens: StrictInt | None = Field(None, le=MAX_INT32)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        """400 for field combinations this server does not take (top_logprobs without logprobs)."""
        super().check_unsupported()
        # tools, tool_choice and response_format are checked by serving/tools.py (plan_chat)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")

    def limit(self) -> int | None:
        """The completion token limit: `max_completion_tokens`, else `max_tokens` (None: up to the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM-compatible; lm-evaluation-harness' remote tokenizer uses it)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: StrictStr
    add_special_tokens: StrictBool = False
    model: StrictStr | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(strict=True, extra="ignore")

    tokens: list[StrictInt]
    model: StrictStr | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. `pooling` (an extension): "mean" over the input's tokens (default) or the
    "last" token's final hidden state."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: StrictStr
    input: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1, le=MAX_INT32)
    pooling: Literal["mean", "last"] = "mean"
    user: StrictStr | None = None
