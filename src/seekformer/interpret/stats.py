"""Routing statistics over a corpus, and specialization between two corpora.

    windows = token_windows(tokenizer, perplexity_documents("builtin"), window=256, max_tokens=20_000)
    stats = routing_stats(model, windows)          # {"layers": [{"layer", "load", "entropy", ...}], ...}
    compare_stats(stats_a, stats_b)                # JS divergence of the expert loads per layer

Per MoE layer: `load` (fraction of the token->expert assignments each expert received; sums to 1),
`entropy` of that distribution (nats, and `entropy_norm` = entropy / log E, 1 = perfectly even),
`max_over_mean` / `min_over_mean` of the per-expert counts, `dead` experts, `top_quarter_share` (load of
the busiest quarter of the experts), and `same_expert_rate`: the mean fraction of a token's K experts that
the next token (same window) also uses, against `same_expert_chance` = sum_e f_e^2 / K, the rate if tokens
picked experts independently with the measured marginals f_e = P(token uses e).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from .capture import InspectError, capture, moe_layer_ids


def token_windows(tokenizer, documents: Iterable[str], window: int, max_tokens: int | None = None,
                  separator: int | None = None) -> list[list[int]]:
    """Documents -> one token stream (each document preceded by `separator`, default eos) cut into windows of
    `window` tokens (the last may be shorter), stopping after about `max_tokens` tokens."""
    if window < 2:
        raise InspectError(f"window must be at least 2 tokens, got {window}")
    sep = tokenizer.eos_token_id if separator is None else separator
    stream: list[int] = []
    for text in documents:
        stream.append(sep)
        stream.extend(tokenizer.encode(text))
        if max_tokens is not None and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    if len(stream) < 2:
        raise InspectError("no text to analyse: the corpus is empty")
    return [stream[i:i + window] for i in range(0, len(stream), window) if len(stream[i:i + window]) >= 2]


def batches(windows: Sequence[list[int]], batch_size: int) -> Iterable[torch.Tensor]:
    """Windows of equal length stacked into [B,W] tensors (a shorter last window on its own)."""
    full = [w for w in windows if len(w) == len(windows[0])]
    rest = [w for w in windows if len(w) != len(windows[0])]
    for i in range(0, len(full), batch_size):
        yield torch.tensor(full[i:i + batch_size])
    for w in rest:
        yield torch.tensor([w])


class RoutingAccumulator:
    """Counts per MoE layer over many captured forwards (no padding: every position is a real token)."""

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int) -> None:
        self.k, self.e = top_k, num_experts
        self.counts = {i: torch.zeros(num_experts, dtype=torch.float64) for i in moe_layers}
        self.overlap = dict.fromkeys(moe_layers, 0.0)
        self.pairs = dict.fromkeys(moe_layers, 0)
        self.tokens = 0

    def add(self, cap) -> None:
        for i, r in cap.routing.items():
            b, t, k = r.indices.shape
            chosen = torch.zeros(b, t, self.e).scatter_(2, r.indices.cpu(), 1.0)  # [B,T,E]
            self.counts[i] += chosen.sum((0, 1)).double()
            if t > 1:
                self.overlap[i] += float((chosen[:, 1:] * chosen[:, :-1]).sum()) / k
                self.pairs[i] += b * (t - 1)
        if cap.routing:
            r = next(iter(cap.routing.values()))
            self.tokens += r.indices.shape[0] * r.indices.shape[1]

    def summary(self) -> dict:
        layers = []
        for i, c in self.counts.items():
            total = float(c.sum())
            frac = (c / total) if total > 0 else c
            nz = frac[frac > 0]
            ent = float(-(nz * nz.log()).sum())
            f = c / max(1, self.tokens)  # P(a token uses expert e); sums to K
            mean = float(c.mean())
            q = max(1, self.e // 4)
            layers.append({
                "layer": i, "counts": [int(x) for x in c.tolist()], "load": [round(float(x), 6) for x in frac],
                "entropy": round(ent, 6), "entropy_norm": round(ent / math.log(self.e), 6) if self.e > 1 else 1.0,
                "max_over_mean": round(float(c.max()) / mean, 6) if mean else 0.0,
                "min_over_mean": round(float(c.min()) / mean, 6) if mean else 0.0,
                "dead": int((c == 0).sum()),
                "top_quarter_share": round(float(frac.sort(descending=True).values[:q].sum()), 6),
                "same_expert_rate": round(self.overlap[i] / self.pairs[i], 6) if self.pairs[i] else None,
                "same_expert_chance": round(float((f * f).sum()) / self.k, 6),
            })
        return {"tokens": self.tokens, "num_experts": self.e, "top_k": self.k, "layers": layers}


@torch.no_grad()
def routing_stats(model, windows: Sequence[list[int]], batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Routing statistics of `model` over token windows (see the module docstring)."""
    moe = moe_layer_ids(model)
    if not moe:
        raise InspectError("this model is dense (no MoE layer): there is no routing to measure")
    ctx = int(model.config.max_position_embeddings)
    if max(len(w) for w in windows) > ctx:
        raise InspectError(f"windows of {max(len(w) for w in windows)} tokens exceed the model context {ctx}")
    acc = RoutingAccumulator(moe, int(model.config.n_routed_experts), int(model.config.num_experts_per_tok))
    with capture(model, routing=True) as cap:
        for ids in batches(windows, batch_size):
            cap.clear()
            model(ids.to(model.device))
            acc.add(cap)
            if progress is not None:
                progress(acc.tokens)
    return acc.summary()


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence of two distributions, in bits (0 = identical, 1 = disjoint)."""
    p_t, q_t = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    p_t, q_t = p_t / p_t.sum(), q_t / q_t.sum()
    m = (p_t + q_t) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        keep = a > 0
        return float((a[keep] * (a[keep] / b[keep]).log2()).sum())

    return 0.5 * kl(p_t, m) + 0.5 * kl(q_t, m)


def compare_stats(a: dict, b: dict) -> dict:
    """Specialization between two corpora: per MoE layer the JS divergence (bits) of their expert loads."""
    by_layer = {x["layer"]: x for x in b["layers"]}
    layers = [{"layer": x["layer"], "js_divergence": round(js_divergence(x["load"], by_layer[x["layer"]]["load"]), 6)}
              for x in a["layers"] if x["layer"] in by_layer]
    mean = sum(x["js_divergence"] for x in layers) / len(layers) if layers else 0.0
    return {"layers": layers, "mean_js_divergence": round(mean, 6)}


def corpus_documents(source: str, text_key: str = "text") -> Iterable[str]:
    """Documents of a corpus source: "builtin" (the quickstart's held-out validation documents),
    "builtin:NAME" (one file of the shipped corpus: moby_dick, shakespeare, sotu), a text/.gz/.jsonl file,
    a directory, or "hf:NAME[:CONFIG]:SPLIT" (see `seekformer.data.corpus`)."""
    from ..data.builtin import corpus_paths, read_corpus_documents
    from ..evaluation.perplexity import perplexity_documents

    if source.startswith("builtin:"):
        names = {p.name.split(".")[0]: p for p in corpus_paths()}
        name = source.split(":", 1)[1]
        if name not in names:
            raise InspectError(f"no builtin corpus {name!r}: choose one of {', '.join(sorted(names))}")
        return read_corpus_documents([names[name]])
    return perplexity_documents(source, text_key)
