"""Which experts image tokens go to versus text tokens, in a vision model (DeepSeek-VL style image tokens in the
MoE trunk's sequence).

    rec = inspect_image_prompt(vlm, tok, "what color is the circle?", ["scene.png"])   # one prompt
    rec["tokens"], rec["is_image"], rec["layers"][i]["experts"]       # per-token routing, image tokens flagged
    rec["modality"]                                                  # per MoE layer: image vs text loads
    stats = modality_stats(vlm, tok, image_examples("data/test.jsonl"))   # the same over many examples

Per MoE layer, `modality` holds the expert loads of the image tokens and of the text tokens (each the fraction
of that modality's token->expert assignments an expert received; sums to 1), their Jensen-Shannon divergence
in bits (0: the same experts, 1: disjoint), the top experts of each modality, and per expert `image_share`:
the fraction of its assignments that came from image tokens, against `image_token_share`, the fraction of
all tokens that are image tokens (an expert far above it specialises in images).
The prompts are the ones VQA fine-tuning, `eval`, `generate --image` and the server use (`image_chat_prompt`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .capture import InspectError, capture, check_layers, moe_layer_ids
from .report import dense_note, routing_lists, token_strings
from .stats import js_divergence


class ModalityCounts:
    """Per MoE layer, expert assignment counts of image tokens and of text tokens."""

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        self.e = num_experts
        self.counts = {i: torch.zeros(2, num_experts, dtype=torch.float64) for i in moe_layers}  # [text, image]
        self.tokens = torch.zeros(2, dtype=torch.long)

    def add(self, cap, is_image_BT: torch.Tensor) -> None:
        img = is_image_BT.long().cpu()
        for i, r in cap.routing.items():
            chosen = torch.zeros(*r.indices.shape[:2], self.e).scatter_(2, r.indices.cpu(), 1.0)  # [B,T,E]
            for m in (0, 1):
                self.counts[i][m] += chosen[img == m].sum(0).double()
        self.tokens += torch.bincount(img.flatten(), minlength=2)

    def summary(self, top: int = 3) -> dict:
        n_text, n_img = (int(x) for x in self.tokens)
        share = n_img / max(1, n_text + n_img)
        layers = []
        for i, c in self.counts.items():
            text, image = (c[m] / c[m].sum() if c[m].sum() > 0 else c[m] for m in (0, 1))
            both = c.sum(0)
            img_share = torch.where(both > 0, c[1] / both.clamp(min=1), torch.zeros_like(both))
            layers.append({
                "layer": i, "image_load": [round(float(x), 6) for x in image],
                "text_load": [round(float(x), 6) for x in text],
                "js_divergence": round(js_divergence(image.tolist(), text.tolist()), 6)
                if n_img and n_text else None,
                "top_image_experts": [int(x) for x in image.argsort(descending=True)[:top]] if n_img else [],
                "top_text_experts": [int(x) for x in text.argsort(descending=True)[:top]] if n_text else [],
                "image_share": [round(float(x), 6) for x in img_share],
            })
        return {"image_tokens": n_img, "text_tokens": n_text, "image_token_share": round(share, 6),
                "num_experts": self.e, "layers": layers}


def _check_moe(vlm) -> list[int]:
    moe = moe_layer_ids(vlm.lm)
    if not moe:
        raise InspectError("this model is dense (no MoE layer): there is no routing to measure")
    return moe


@torch.no_grad()
def inspect_image_prompt(vlm, tok, question: str, images: Sequence[str | Path | bytes],
                         layers: Sequence[int] | None = None) -> dict:
    """The inspection record (see interpret.report) of a question about `images`, with `is_image` per token
    and the per-layer image-vs-text summary under "modality"."""
    from ..inference.vision import pixels_of, question_ids

    if not images:
        raise InspectError("--image needs at least one image")
    ids = question_ids(vlm, tok, question, len(images))  # GenerationError when over the context
    want = check_layers(vlm.lm, layers)
    input_ids = torch.tensor([ids], device=vlm.device)
    is_image = input_ids == vlm.image_token_id
    counts = ModalityCounts(_check_moe(vlm), int(vlm.config.n_routed_experts))
    with capture(vlm.lm, routing=True, layers=want) as cap:
        vlm(input_ids, pixel_values=pixels_of(vlm, images))
    counts.add(cap, is_image)
    flags = is_image[0].tolist()
    tokens = token_strings(tok, ids)
    k = 0
    for j, f in enumerate(flags):
        if f:
            tokens[j], k = f"<image {k}>", k + 1
    summary = counts.summary()
    summary["layers"] = [x for x in summary["layers"] if x["layer"] in cap.routing]
    return {"tokens": tokens, "token_ids": ids, "is_image": flags, "layers": routing_lists(cap),
            "moe_layers": cap.moe_layers, "num_experts": int(vlm.config.n_routed_experts),
            "top_k": int(vlm.config.num_experts_per_tok), "note": dense_note(cap), "modality": summary}


def image_examples(source: str | Path, max_examples: int | None = None) -> list[dict]:
    """(image, question) pairs to route: a jsonl/json/csv with an `image` field (and optionally `question`;
    paths relative to the file's folder) or an ImageFolder directory (no question: the image alone)."""
    from ..data.images import ImageError, read_image_file, read_image_folder

    p = Path(source).expanduser()
    if not p.exists():
        raise InspectError(f"{source}: no such file or folder (--images reads a jsonl of image [+ question] "
                           "records or an image folder)")
    try:
        recs = read_image_folder(p) if p.is_dir() else read_image_file(p, ("image",))
    except ImageError as e:
        raise InspectError(str(e)) from None
    out = [{"image": r["image"], "question": str(r.get("question") or "")} for r in recs]
    if not out:
        raise InspectError(f"{source}: no images")
    return out[:max_examples] if max_examples else out


@torch.no_grad()
def modality_stats(vlm, tok, examples: Iterable[dict], batch_size: int = 16,
                   layers: Sequence[int] | None = None) -> dict:
    """Image-vs-text routing summary (see the module docstring) over examples {"image", "question"}.
    Examples are batched by prompt length (no padding, so every position is a real token)."""
    from ..inference.vision import pixels_of, question_ids

    moe = _check_moe(vlm)
    want = set(check_layers(vlm.lm, layers))
    counts = ModalityCounts([i for i in moe if i in want], int(vlm.config.n_routed_experts))
    by_len: dict[int, list[tuple[list[int], str]]] = {}
    n = 0
    for ex in examples:
        ids = question_ids(vlm, tok, ex["question"], 1)
        by_len.setdefault(len(ids), []).append((ids, ex["image"]))
        n += 1
    with capture(vlm.lm, routing=True, layers=sorted(want)) as cap:
        for group in by_len.values():
            for s in range(0, len(group), batch_size):
                chunk = group[s: s + batch_size]
                ids = torch.tensor([c[0] for c in chunk], device=vlm.device)
                cap.clear()
                vlm(ids, pixel_values=pixels_of(vlm, [c[1] for c in chunk]))
                counts.add(cap, ids == vlm.image_token_id)
    out = counts.summary()
    out["examples"] = n
    return out


__all__ = ["inspect_image_prompt", "modality_stats", "image_examples", "ModalityCounts"]
