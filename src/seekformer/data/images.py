"""Images for vision-language tasks: decoding (Pillow), resizing, normalization, task records.

    load_image(path | bytes, size, channels)       -> uint8 tensor [C,S,S] (grey / RGBA / palette converted)
    normalize(uint8 [B,C,S,S])                     -> float [B,C,S,S] in [-1, 1]
    read_image_records(source, task_type, fields)  -> records with absolute image paths

Sources of an image task's split:
* an ImageFolder directory: one sub-folder per class, the folder name is the label (image_classification);
* a jsonl file: {"image": PATH, "label": STR} (image_classification) or {"image": PATH, "question": STR,
  "answer": STR} (vqa); relative image paths are relative to the jsonl file's folder.

Every problem (missing, corrupt or non-image file, a huge image, a line without its keys, an empty class
folder) raises `ImageError` (a DataError: one line, exit code 2 / HTTP 4xx); `ImageTooLarge` for images
over the byte or pixel limits (HTTP 413).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError

IMAGE_TOKEN = "<|image|>"  # one marker per image in prompts; the model expands it to its M image tokens
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image file / data URL
MAX_IMAGE_PIXELS = 40_000_000  # width x height (decompression-bomb guard)


class ImageError(DataError):
    """A missing, unreadable, corrupt or unsupported image (or image record)."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit."""


def _open(data: bytes, where: str, max_pixels: int):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - the vision extra installs Pillow
        raise ImageError("images need Pillow: pip install 'seekformer[vision]'") from None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLarge(f"{where}: image of {w}x{h} pixels is over the limit of {max_pixels:,} pixels; "
                                "downscale it")
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{where}: image is over Pillow's decompression-bomb pixel limit; downscale it") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}); use PNG or JPEG") from None
    return img


def load_image(src: str | os.PathLike | bytes, size: int, channels: int = 3, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS, where: str | None = None) -> torch.Tensor:
    """Read an image (path or encoded bytes) -> uint8 tensor [channels, size, size] (bilinear resize).

    Grey, palette, RGBA (composited on white) and CMYK images are converted to `channels` (1: L, 3: RGB).
    """
    if isinstance(src, (bytes, bytearray)):
        data, where = bytes(src), where or "image"
    else:
        path = Path(src)
        where = where or str(path)
        if not path.is_file():
            raise ImageError(f"{where}: image file not found")
        if path.stat().st_size > max_bytes:
            raise ImageTooLarge(f"{where}: image file of {path.stat().st_size:,} bytes is over the limit of "
                                f"{max_bytes:,} bytes")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{where}: image of {len(data):,} bytes is over the limit of {max_bytes:,} bytes")
    img = _open(data, where, max_pixels)
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def normalize(pixels_BCSS: torch.Tensor) -> torch.Tensor:
    """uint8 [B,C,S,S] (0..255) -> float32 in [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return pixels_BCSS.float().div_(127.5).sub_(1.0)


def decode_data_url(url: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """`data:image/png;base64,...` -> the image bytes (ImageError when malformed, ImageTooLarge when big)."""
    if not url.startswith("data:"):
        raise ImageError("image_url must be a data: URL (data:image/png;base64,...)")
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise ImageError("image data URL must be base64-encoded: data:image/png;base64,...")
    if not head[5:].startswith("image/"):
        raise ImageError(f"data URL media type {head[5:].split(';')[0]!r} is not an image")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"image of about {len(payload) * 3 // 4:,} bytes is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None


def image_message(text: str, n_images: int = 1, text_first: bool = True) -> str:
    """A user message about image(s): the text, then one marker per image (`text_first`, so that in the causal
    trunk the image tokens see the question), or the markers first (models trained before `text_first`)."""
    return text + IMAGE_TOKEN * n_images if text_first else IMAGE_TOKEN * n_images + text


def image_chat_prompt(tokenizer, question: str, n_images: int = 1, text_first: bool = True) -> str:
    """The prompt of a question about image(s): the chat format of one user message (`image_message`).

    VQA training, `eval`, `generate --image`, chat `/image` and the server all build prompts this way, with
    the model's `vision.text_first`."""
    return tokenizer.apply_chat_template([{"role": "user", "content": image_message(question, n_images, text_first)}])


# ====================================================================== task records
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def read_image_folder(root: Path) -> list[dict[str, str]]:
    """ImageFolder layout: root/CLASS/*.png -> [{"image": abs path, "label": CLASS}] (classes sorted)."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ImageError(f"{root}: no class folders; an image folder holds one sub-folder of images per class")
    out = []
    for d in classes:
        files = sorted(p for p in d.iterdir() if _is_image(p))
        if not files:
            raise ImageError(f"{d}: empty class folder (no {'/'.join(s[1:] for s in IMAGE_SUFFIXES[:3])} images); "
                             "add images or remove the folder")
        out += [{"image": str(p.resolve()), "label": d.name} for p in files]
    return out


def read_image_file(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Records of a jsonl (or .json / .csv) file with the `required` keys; the image path (the first key) is
    made absolute, relative to the file's folder."""
    from .task_sources import read_records

    out = []
    for i, rec in enumerate(read_records(str(path)), start=1):
        missing = [k for k in required if not isinstance(rec, dict) or rec.get(k) in (None, "")]
        if missing:
            raise ImageError(f"{path} line {i}: missing {', '.join(repr(k) for k in missing)} (an image record "
                             f"needs {', '.join(required)})")
        img = Path(str(rec[required[0]])).expanduser()
        out.append({**rec, required[0]: str(img if img.is_absolute() else (path.parent / img).resolve())})
    return out


def read_image_records(source: str, task_type: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Records of an image task split from an ImageFolder directory or a jsonl file (see the module doc)."""
    fields = fields or {}
    roles = ("image", "label") if task_type == "image_classification" else ("image", "question", "answer")
    p = Path(source).expanduser()
    if not p.exists():
        raise ImageError(f"{source}: no such file or folder (an image task reads an image folder or a jsonl file)")
    if p.is_dir():
        if task_type != "image_classification":
            raise ImageError(f"{source}: a {task_type} task reads a jsonl file of image, question and answer")
        recs = read_image_folder(p)
        return [{fields.get(k, k): v for k, v in r.items()} for r in recs]
    return read_image_file(p, tuple(fields.get(r, r) for r in roles))


__all__ = ["IMAGE_TOKEN", "image_chat_prompt", "image_message", "load_image", "normalize", "decode_data_url", "read_image_records", "read_image_folder",
           "read_image_file", "ImageError", "ImageTooLarge", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS",
           "IMAGE_SUFFIXES"]
