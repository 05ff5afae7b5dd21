"""Images in /v1/chat/completions: OpenAI `image_url` content parts for a model with a vision tower.

    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                 {"type": "text", "text": "what color is the circle?"}]}

A message's text parts are joined and its image parts become `<|image|>` markers placed as
`data.images.image_message` places them (after the text for models with `vision.text_first`, before it for
older ones): the prompt of `image_chat_prompt`, so a VQA fine-tune answers as `seekformer eval` scored it;
the model splices its image tokens in there. Errors: a text-only model given an image -> 400; a remote http(s) URL
-> 400 unless the server allows remote images; a malformed data URL or an unreadable image -> 400; an
image over the byte limit -> 413, over the pixel limit -> 400. Requests with images are decoded outside
the batching engine (one at a time, in a worker thread), without streaming of partial tokens: a `stream`
request gets the whole answer as one chunk.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..data.images import (IMAGE_TOKEN, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, ImageTooLarge,
                           decode_data_url, image_message, load_image, normalize)
from ..errors import SeekformerError
from .protocol import APIError, bad_request


@dataclass
class VisionOptions:
    """What the server accepts as images (`seekformer serve --allow-remote-images` and the limits)."""

    allow_remote_images: bool = False  # fetch http(s) image URLs (off: 400)
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    fetch_timeout: float = 10.0


def load_server_vision(model, model_dir):
    """A SeekForVisionLM sharing `model` (the served LM) when `model_dir` has vision files, else None."""
    from ..models.vision_lm import SeekForVisionLM, is_vision_dir

    return SeekForVisionLM.around(model, model_dir) if is_vision_dir(model_dir) else None


def has_images(req) -> bool:
    """Whether any message of a chat request has an image_url part."""
    return any(isinstance(m.content, list) and any(getattr(p, "type", "") == "image_url" for p in m.content)
               for m in req.messages)


def _fetch(url: str, opts: VisionOptions) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=opts.fetch_timeout) as r:  # noqa: S310 - allowed by the operator
            data = r.read(opts.max_image_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any network failure is the client's URL problem
        raise bad_request(f"cannot fetch image {url[:80]} ({type(e).__name__})", "messages", "image_fetch_failed") \
            from None
    if len(data) > opts.max_image_bytes:
        raise APIError(413, f"the image at {url[:80]} is over the limit of {opts.max_image_bytes:,} bytes",
                       "messages", "image_too_large")
    return data


def _image_bytes(url: str, opts: VisionOptions, param: str) -> bytes:
    if url.startswith(("http://", "https://")):
        if not opts.allow_remote_images:
            raise bad_request("remote image URLs are refused by this server: send the image inline as a data: URL "
                              "(data:image/png;base64,...) or start the server with --allow-remote-images",
                              param, "remote_image_refused")
        return _fetch(url, opts)
    try:
        return decode_data_url(url, opts.max_image_bytes)
    except ImageTooLarge as e:
        raise APIError(413, str(e), param, "image_too_large") from None
    except ImageError as e:
        raise bad_request(str(e), param, "invalid_image") from None


class VisionChat:
    """Answers chat requests that carry images (see the module docstring)."""

    def __init__(self, handlers, vision, options: VisionOptions | None = None) -> None:
        self.h, self.vlm, self.opts = handlers, vision, options or VisionOptions()
        self.lock = threading.Lock()

    def _inputs(self, req) -> tuple[list[int], list[Any]]:
        from .tools import ROLES as CHAT_ROLES_MAP

        messages, images = [], []
        cfg = self.vlm.vision.config
        for k, m in enumerate(req.messages):
            role = CHAT_ROLES_MAP.get(m.role)
            if role is None:
                raise bad_request(f"messages[{k}].role must be one of {', '.join(CHAT_ROLES_MAP)}, got {m.role!r}",
                                  f"messages.{k}.role")
            if not isinstance(m.content, list):
                messages.append({"role": role, "content": m.content or ""})
                continue
            text, n_images = [], 0
            for j, part in enumerate(m.content):
                if part.type == "text":
                    if IMAGE_TOKEN in part.text:
                        raise bad_request(f"messages[{k}] text contains {IMAGE_TOKEN}: send images as image_url parts",
                                          f"messages.{k}.content.{j}")
                    text.append(part.text)
                    continue
                param = f"messages.{k}.content.{j}.image_url"
                data = _image_bytes(part.image_url.url, self.opts, param)
                try:
                    images.append(load_image(data, cfg.image_size, cfg.channels, self.opts.max_image_bytes,
                                             self.opts.max_image_pixels, where=f"messages[{k}].content[{j}]"))
                except ImageTooLarge as e:
                    raise (APIError(413, str(e), param, "image_too_large") if "bytes" in str(e)
                           else bad_request(str(e), param, "image_too_large")) from None
                except ImageError as e:
                    raise bad_request(str(e), param, "invalid_image") from None
                n_images += 1
            messages.append({"role": role, "content": image_message("".join(text), n_images, cfg.text_first)})
        ids = self.h.tok.encode(self.h.tok.apply_chat_template(messages, add_generation_prompt=True))
        return ids, images

    def _generate(self, ids: list[int], images, max_tokens: int, params) -> tuple[list[int], str, str]:
        import torch

        from ..inference.vision import expand_prompt

        full = expand_prompt(self.vlm, ids, len(images))
        pix = normalize(torch.stack(images)).to(self.vlm.device)
        with self.lock, torch.no_grad():
            out = self.vlm.generate([full], pix, return_dict=True, tokenizer=self.h.tok, **params)
        toks = out.new_tokens[0]
        return toks, out.texts[0], out.finish_reasons[0]

    async def chat(self, req) -> Any:
        """A chat completion whose messages carry images (n = 1, no logprobs): the images are fetched or
        decoded within the limits, encoded by the vision tower, and spliced in place of the image tokens."""
        h = self.h
        if req.n != 1 or req.logprobs:
            raise bad_request("requests with images support n = 1 and no logprobs", "n" if req.n != 1 else "logprobs",
                              "unsupported_parameter")
        ids, images = self._inputs(req)
        from ..inference.vision import expand_prompt

        try:
            n_full = len(expand_prompt(self.vlm, ids, len(images)))
        except SeekformerError as e:
            raise bad_request(str(e), "messages", "context_length_exceeded") from None
        limit = req.limit()
        max_tokens = h.context - n_full if limit is None else limit
        h._check_prompt([0] * n_full, max_tokens, "messages")
        stops = tuple(h.end_of_turn)
        sp = h._params(req, max_tokens, None, req.stop_list(), stops)
        params = dict(max_new_tokens=sp.max_new_tokens, do_sample=sp.do_sample, temperature=sp.temperature,
                      top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p, repetition_penalty=sp.repetition_penalty,
                      seed=sp.seed, stop=sp.stop, stop_token_ids=sp.stop_token_ids)
        toks, text, finish = await asyncio.to_thread(self._generate, ids, images, max_tokens, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": n_full, "completion_tokens": len(toks), "total_tokens": n_full + len(toks)}
        if req.stream:
            return self._one_chunk_stream(rid, created, text, finish, usage if req.include_usage() else None)
        return {"id": rid, "object": "chat.completion", "created": created, "model": h.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}], "usage": usage}

    async def _one_chunk_stream(self, rid, created, text, finish, usage):
        import json

        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.h.model_name}
        yield json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                               "logprobs": None, "finish_reason": finish}]})
        if usage is not None:
            yield json.dumps({**base, "choices": [], "usage": usage})
        yield "[DONE]"


def refuse_text_only(req, model_name: str) -> None:
    """400 for image parts sent to a model without a vision tower."""
    if has_images(req):
        raise bad_request(f"the model '{model_name}' is text-only (no vision tower): it cannot read image_url parts; "
                          "send text only, or serve a model fine-tuned with image tasks", "messages",
                          "images_not_supported")


__all__ = ["VisionChat", "VisionOptions", "load_server_vision", "has_images", "refuse_text_only"]
