"""Generation and chat with images (a model directory with vision files, e.g. a VQA fine-tune).

    vlm, tok = load_vision_model(MODEL_DIR)
    for piece in stream_with_images(vlm, tok, "what color is the circle?", [png_bytes_or_path]):
        print(piece, end="")

Prompts use `data.images.image_chat_prompt` (the chat format with one `<|image|>` marker per image), the
format VQA fine-tuning and `seekformer eval` use, so a VQA model answers here as it was scored. Replies
end at `<|end_of_turn|>` or eos.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data.images import IMAGE_TOKEN, image_chat_prompt, image_message, load_image, normalize
from ..errors import GenerationError
from .chat import ChatSession
from .generate import stream


def load_vision_model(model_dir, device: str = "cpu", dtype: str | None = None):
    """(SeekForVisionLM in eval mode, SeekTokenizer); GenerationError when the model has no vision tower."""
    from ..checkpoint import check_model_dir
    from ..models.vision_lm import SeekForVisionLM, is_vision_dir
    from ..tokenizer import SeekTokenizer
    path = check_model_dir(model_dir)
    if not is_vision_dir(path):
        raise GenerationError(f"{path} is a text-only model (no vision.json): it cannot read images; fine-tune it "
                              "with image tasks first")
    from ..models.loading import check_device, parse_dtype

    torch_dtype = parse_dtype(dtype)  # one dtype vocabulary (SeekformerError for unknown names)
    device = check_device(device)
    vlm = SeekForVisionLM.from_pretrained(path, device=device)
    if torch_dtype is not None and torch_dtype != torch.float32:
        vlm.to(torch_dtype)
    return vlm.eval(), SeekTokenizer.load(path)


def pixels_of(vlm, images: Sequence[str | Path | bytes]) -> torch.Tensor | None:
    """Images (paths or encoded bytes) -> normalized pixels [N,C,S,S] at the model's image size."""
    if not images:
        return None
    cfg = vlm.vision.config
    return normalize(torch.stack([load_image(im, cfg.image_size, cfg.channels) for im in images])).to(vlm.device)


def expand_prompt(vlm, ids: list[int], n_images: int) -> list[int]:
    """Check one marker per image and expand each into the model's image tokens."""
    from ..models.vision_lm import expand_image_markers

    found = sum(1 for t in ids if t == vlm.image_token_id)
    if found != n_images:
        raise GenerationError(f"the prompt has {found} {IMAGE_TOKEN} marker(s) for {n_images} image(s)")
    out = expand_image_markers(ids, vlm.image_token_id, vlm.num_image_tokens)
    ctx = vlm.config.max_position_embeddings
    if len(out) >= ctx:
        raise GenerationError(f"the prompt with its images takes {len(out)} tokens; the context holds {ctx}")
    return out


def _stop_ids(tok) -> tuple[int, ...]:
    return tuple(i for i in (tok.end_of_turn_token_id,) if i is not None)


def question_ids(vlm, tok, question: str, n_images: int) -> list[int]:
    """The prompt ids of a question about `n_images` images (image_chat_prompt, markers expanded into the
    model's image tokens): what generation, chat and `inspect --image` feed the model."""
    prompt = image_chat_prompt(tok, question, n_images, vlm.vision.config.text_first)
    return expand_prompt(vlm, tok.encode(prompt), n_images)


def stream_with_images(vlm, tok, question: str, images: Sequence[str | Path | bytes], **options) -> Iterator[str]:
    """Stream the answer to `question` about `images` (prompt: `question_ids`)."""
    ids = question_ids(vlm, tok, question, len(images))
    options["stop_token_ids"] = tuple(options.get("stop_token_ids", ())) + _stop_ids(tok)
    yield from stream_ids(vlm, tok, ids, pixels_of(vlm, images), **options)


def stream_ids(vlm, tok, ids: list[int], pixel_values: torch.Tensor | None, **options) -> Iterator[str]:
    """`inference.generate.stream` over prompt ids whose image placeholders take `pixel_values`."""
    from ..models.vision_lm import image_prefill

    with image_prefill(vlm, pixel_values) as lm:
        yield from stream(lm, tok, ids, **options)


class VisionChatSession(ChatSession):
    """ChatSession whose user messages may carry images: `add_image(path)` attaches one to the next message."""

    def __init__(self, model, tokenizer, system: str | None = None, **options) -> None:
        self.vlm = model
        super().__init__(model.lm, tokenizer, system=system, **options)
        self.pending: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []

    def reset(self) -> None:
        super().reset()
        self.images, self.pending = [], []

    def add_image(self, src: str | Path | bytes) -> None:
        self.pending.append(pixels_of(self.vlm, [src])[0])

    def send(self, text: str) -> Iterator[str]:
        if not text.strip():
            raise GenerationError("empty message")
        content = image_message(text, len(self.pending), self.vlm.vision.config.text_first)
        self.images += self.pending
        self.pending = []
        self.messages.append({"role": "user", "content": content})
        ids = self._prompt_ids()
        n = sum(1 for t in ids if t == self.vlm.image_token_id)
        self.images = self.images[len(self.images) - n:] if n else []  # images of trimmed turns go too
        pix = torch.stack(self.images) if self.images else None
        reply = []
        for piece in stream_ids(self.vlm, self.tokenizer, expand_prompt(self.vlm, ids, n), pix, **self.options):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})


__all__ = ["load_vision_model", "pixels_of", "expand_prompt", "question_ids", "stream_with_images", "stream_ids",
           "VisionChatSession"]
