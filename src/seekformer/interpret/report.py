"""One prompt -> the inspection record (tokens, routing per MoE layer, attention per layer) as JSON.

    {"tokens": [str], "token_ids": [int],
     "layers": [{"layer": i, "experts": [[k ids] per token], "weights": [[k floats] per token],
                 "shared_share": [float per token] | null} for each MoE layer],
     "attention": [per layer [heads][T][T]],
     "attention_layers": [layer numbers of "attention"], "moe_layers": [...], "num_experts": E, "note": str}

Experts of a token are listed by decreasing gate weight. Layer numbers are the model's (from 0).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import torch

from .capture import Capture, check_layers, forward_with_capture


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as text (its bytes decoded leniently: a split multi-byte character shows as U+FFFD)."""
    return [tokenizer.token_bytes(int(t)).decode("utf-8", errors="replace") for t in ids]


def routing_lists(cap: Capture, row: int = 0) -> list[dict]:
    """Per captured MoE layer: experts and weights per token (by decreasing weight), shared share."""
    layers = []
    for idx in sorted(cap.routing):
        r = cap.routing[idx]
        w, order = r.weights[row].sort(dim=-1, descending=True)
        experts = r.indices[row].gather(-1, order)
        layers.append({"layer": idx, "experts": experts.tolist(),
                       "weights": [[round(float(x), 6) for x in ws] for ws in w.tolist()],
                       "shared_share": None if r.shared_share is None else
                       [round(float(x), 4) for x in r.shared_share[row].tolist()]})
    return layers


def dense_note(cap: Capture) -> str | None:
    if not cap.moe_layers:
        return "this model is dense (no MoE layer): there is no routing to show"
    return None


def inspect_prompt(model, tokenizer, ids: Sequence[int], attention: bool = True, layers: Sequence[int] | None = None,
                   attention_format: str = "full") -> dict:
    """The inspection record of one token sequence.

    attention_format: "full" ([layer][head][T][T] floats), "mean_u8" (per layer the head mean, T*T bytes of
    round(255 p), row-major, base64: compact enough for a browser at 1,024 tokens), or "none".
    """
    ids = [int(t) for t in ids]
    want = check_layers(model, layers)
    out, cap = forward_with_capture(model, torch.tensor([ids]), routing=True,
                                    attention=attention and attention_format != "none", layers=want)
    record = {"tokens": token_strings(tokenizer, ids), "token_ids": ids, "layers": routing_lists(cap),
              "moe_layers": cap.moe_layers, "num_experts": int(getattr(model.config, "n_routed_experts", 0) or 0)
              if cap.moe_layers else 0, "top_k": int(model.config.num_experts_per_tok) if cap.moe_layers else 0,
              "attention_layers": sorted(cap.attention), "note": dense_note(cap)}
    if attention_format == "full":
        record["attention"] = [((cap.attention[i][0] * 1e6).round() / 1e6).tolist() for i in sorted(cap.attention)]
    elif attention_format == "mean_u8":
        record["attention_u8"] = [base64.b64encode((cap.attention[i][0].mean(0) * 255).round().to(torch.uint8)
                                                   .numpy().tobytes()).decode("ascii") for i in sorted(cap.attention)]
    return record
