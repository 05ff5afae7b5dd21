"""Causal tools: switch experts off, or bias the router, inside a `with` block.

    with ablate_experts(model, {1: [3, 5]}):            # layer 1 without experts 3 and 5
        loss = model(ids, labels=ids).lm_loss
    with bias_router(model, {2: {0: 0.5}}):             # layer 2 prefers expert 0
        ...
    report = ablation_report(model, windows)            # loss increase when each expert is ablated

Ablation modes: "zero" (default) keeps the router's choice and drops the ablated experts' contribution
(their gate weight becomes 0; the other experts are unchanged); "reroute" makes the ablated experts
unselectable, so the router picks the next-best experts instead (noaux_tc routing only, through the
selection bias). Both restore the model exactly on exit: "zero" is a forward hook, and the bias is
saved and written back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from .capture import InspectError, decoder_layers, moe_layer_ids
from .stats import batches, routing_stats

UNSELECTABLE = -1e4  # selection bias of a rerouted-away expert (scores are in [0, 1])


def _moe(model, layer: int):
    moe = moe_layer_ids(model)
    if layer not in moe:
        raise InspectError(f"layer {layer} is not an MoE layer: MoE layers are {moe or 'none (a dense model)'}")
    return next(b.mlp for b in decoder_layers(model) if int(b.layer_idx) == layer)


def _check_experts(moe, layer: int, experts: Iterable[int]) -> list[int]:
    out = sorted({int(e) for e in experts})
    bad = [e for e in out if not 0 <= e < moe.num_experts]
    if bad:
        raise InspectError(f"layer {layer} has experts 0..{moe.num_experts - 1}, not {bad}")
    return out


@contextmanager
def bias_router(model, deltas: Mapping[int, Mapping[int, float] | torch.Tensor]) -> Iterator[None]:
    """Add `deltas[layer][expert]` (or a [E] tensor) to the selection bias of those layers while inside."""
    saved = []
    try:
        for layer, delta in deltas.items():
            gate = _moe(model, int(layer)).gate
            if gate.topk_method != "noaux_tc":
                raise InspectError(f"layer {layer} routes with {gate.topk_method!r}: only noaux_tc routing has a "
                                   "selection bias to move")
            if isinstance(delta, torch.Tensor):
                d = delta.to(gate.e_score_correction_bias)
            else:
                d = torch.zeros_like(gate.e_score_correction_bias)
                for e in _check_experts(gate, layer, delta):
                    d[e] = float(delta[e])
            saved.append((gate, gate.e_score_correction_bias.clone()))
            gate.e_score_correction_bias.add_(d)
        yield
    finally:
        for gate, old in saved:
            gate.e_score_correction_bias.copy_(old)


@contextmanager
def ablate_experts(model, experts: Mapping[int, Iterable[int]], mode: str = "zero") -> Iterator[None]:
    """Switch off `experts[layer]` (expert ids) in those MoE layers while inside (see module docstring)."""
    if mode not in ("zero", "reroute"):
        raise InspectError(f"unknown ablation mode {mode!r}: use zero or reroute")
    plan = {int(layer): _check_experts(_moe(model, int(layer)), int(layer), ex) for layer, ex in experts.items()}
    if mode == "reroute":
        with bias_router(model, {layer: dict.fromkeys(ex, UNSELECTABLE) for layer, ex in plan.items()}):
            yield
        return
    handles = []
    try:
        for layer, ex in plan.items():
            off = torch.tensor(ex, dtype=torch.long)

            def hook(module, args, r, off=off):
                hit = torch.isin(r.indices, off.to(r.indices.device))
                return replace(r, weights=r.weights.masked_fill(hit, 0.0))

            handles.append(_moe(model, layer).gate.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _mean_loss(model, windows: Sequence[list[int]], batch_size: int) -> float:
    total, n = 0.0, 0
    for ids in batches(windows, batch_size):
        ids = ids.to(model.device)
        loss = model(ids, labels=ids).lm_loss
        count = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss) * count
        n += count
    return total / max(1, n)


@torch.no_grad()
def ablation_report(model, windows: Sequence[list[int]], layers: Sequence[int] | None = None, mode: str = "zero",
                    batch_size: int = 8, progress: Callable[[str], None] | None = None) -> dict:
    """Mean next-token loss with nothing ablated, then with each expert of each MoE layer ablated alone.

    Returns {"baseline_loss", "tokens", "mode", "layers": [{"layer", "experts": [{"expert", "loss",
    "delta", "load"}]}]}, `load` being the expert's share of the layer's routed assignments (unablated).
    """
    moe = moe_layer_ids(model)
    if not moe:
        raise InspectError("this model is dense (no MoE layer): there are no experts to ablate")
    layers = list(moe) if layers is None else [int(x) for x in layers]
    for layer in layers:
        _moe(model, layer)
    stats = routing_stats(model, windows, batch_size)
    loads = {x["layer"]: x["load"] for x in stats["layers"]}
    base = _mean_loss(model, windows, batch_size)
    out = {"baseline_loss": round(base, 6), "tokens": stats["tokens"], "mode": mode, "layers": []}
    for layer in layers:
        rows = []
        for e in range(int(model.config.n_routed_experts)):
            if progress is not None:
                progress(f"layer {layer} expert {e}")
            with ablate_experts(model, {layer: [e]}, mode=mode):
                loss = _mean_loss(model, windows, batch_size)
            rows.append({"expert": e, "loss": round(loss, 6), "delta": round(loss - base, 6),
                         "load": loads[layer][e]})
        out["layers"].append({"layer": layer, "experts": rows})
    return out
