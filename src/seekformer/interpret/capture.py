"""Capture expert routing and attention probabilities with forward hooks.

    with capture(model, routing=True, attention=True) as cap:
        model(input_ids)
    cap.routing[1].indices      # [B,T,K] experts chosen in MoE layer 1
    cap.attention[0]            # [B,H,T,T] attention probabilities of layer 0

    out, cap = forward_with_capture(model, input_ids)   # the `model(..., output_router=True)` equivalent

Nothing is stored on the modules and nothing runs when no capture is active: the hooks are registered on
entry and removed on exit. They record only forwards run by the thread that opened the capture (a server
may decode on another thread with the same model meanwhile), and keep the most recent forward per layer.

Per MoE layer (`LayerRouting`, tensors shaped [B,T,...]): the top-k expert ids and gate weights as the
router returned them, the unbiased scores, the bias-adjusted scores the selection ran on, and the shared
experts' share of the layer output, ||shared|| / (||shared|| + ||routed||) per token. Attention comes from
`MLA.attention_probs` on the layer's own inputs (full sequence, no KV cache; forwards that use a cache are
not recorded).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SeekformerError
from ..nn.moe import MoE


class InspectError(SeekformerError):
    """Bad inspection input: unknown layer, prompt longer than the context, nothing to capture."""


@dataclass
class LayerRouting:
    """One MoE layer's routing for a [B,T] batch."""

    layer: int
    indices: torch.Tensor  # [B,T,K] chosen experts
    weights: torch.Tensor  # [B,T,K] gate weights (fp32, as the experts were weighted)
    scores: torch.Tensor  # [B,T,E] sigmoid/softmax scores (unbiased)
    choice_scores: torch.Tensor  # [B,T,E] the scores top-k selection ran on (+ e_score_correction_bias for noaux_tc)
    shared_share: torch.Tensor | None  # [B,T] shared experts' share of the output norm (None: no shared experts)

    @property
    def num_experts(self) -> int:
        return self.scores.shape[-1]


@dataclass
class Capture:
    """What a `capture` recorded: `routing[layer]` and `attention[layer]` ([B,H,T,T] fp32)."""

    routing: dict[int, LayerRouting] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    moe_layers: list[int] = field(default_factory=list)
    num_layers: int = 0

    def clear(self) -> None:
        self.routing.clear()
        self.attention.clear()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a SeekForCausalLM (or of a trunk with `.layers`), MTP blocks excluded."""
    trunk = getattr(model, "model", model)
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InspectError(f"{type(model).__name__} has no decoder layers to inspect")
    return layers


def moe_layer_ids(model: nn.Module) -> list[int]:
    """Layer numbers (from 0, as in the model) of the MoE layers."""
    return [int(layer.layer_idx) for layer in decoder_layers(model) if isinstance(layer.mlp, MoE)]


def check_layers(model: nn.Module, layers: Sequence[int] | None, need_moe: bool = False) -> list[int]:
    """Validate requested layer numbers (None = all); unknown ones (or dense ones when `need_moe`) raise."""
    n = len(decoder_layers(model))
    if layers is None:
        return list(range(n))
    moe = set(moe_layer_ids(model))
    out = []
    for i in layers:
        if not 0 <= int(i) < n:
            raise InspectError(f"unknown layer {i}: the model has layers 0..{n - 1} "
                               f"(MoE layers: {sorted(moe) or 'none'})")
        if need_moe and int(i) not in moe:
            raise InspectError(f"layer {i} is dense (no router): MoE layers are {sorted(moe) or 'none'}")
        out.append(int(i))
    return out


_MLA_ARGS = ("x", "cos", "sin", "mask", "cache", "layer", "slots")  # MLA.forward's positional parameters


def _bound(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_MLA_ARGS, args))
    bound.update(kwargs)
    return bound


@contextmanager
def capture(model: nn.Module, routing: bool = True, attention: bool = False,
            layers: Sequence[int] | None = None) -> Iterator[Capture]:
    """Record routing of the MoE layers and/or attention probabilities during forwards in this block.

    layers: layer numbers to record (None = all; unknown numbers raise InspectError).
    """
    wanted = set(check_layers(model, layers))
    owner = threading.get_ident()
    cap = Capture(moe_layers=moe_layer_ids(model), num_layers=len(decoder_layers(model)))
    handles: list = []

    def mine() -> bool:
        return threading.get_ident() == owner

    for block in decoder_layers(model):
        idx = int(block.layer_idx)
        if idx not in wanted:
            continue
        if routing and isinstance(block.mlp, MoE):
            handles += _routing_hooks(block.mlp, idx, cap, mine)
        if attention:
            def attn_hook(module, args, kwargs, idx=idx):
                a = _bound(args, kwargs)
                if mine() and a.get("cache") is None:
                    cap.attention[idx] = module.attention_probs(a["x"], a["cos"], a["sin"], a.get("mask")).detach()
            handles.append(block.self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def _routing_hooks(moe: MoE, idx: int, cap: Capture, mine) -> list:
    """Hooks on one MoE layer: its input shape, the router's Routing, the shared experts' output, the sum."""
    pending: dict = {}

    def pre(module, args):
        if mine():
            pending.clear()
            pending["shape"] = args[0].shape[:2]

    def on_gate(module, args, r):
        if mine() and "shape" in pending:
            pending["routing"] = r

    def on_shared(module, args, y):
        if mine() and "shape" in pending:
            pending["shared"] = y.detach()

    def post(module, args, out):
        if not mine() or "routing" not in pending:
            return
        b, t = pending["shape"]
        r, gate = pending["routing"], module.gate
        choice = r.scores + gate.e_score_correction_bias if gate.topk_method == "noaux_tc" else r.scores
        share = None
        if "shared" in pending:
            shared = pending["shared"].float().view(b, t, -1)
            s_norm = shared.norm(dim=-1)
            routed_norm = (out.detach().float() - shared).norm(dim=-1)
            share = s_norm / (s_norm + routed_norm).clamp_min(1e-20)
        k = r.indices.shape[-1]
        cap.routing[idx] = LayerRouting(idx, r.indices.detach().view(b, t, k), r.weights.detach().view(b, t, k),
                                        r.scores.detach().view(b, t, -1), choice.detach().view(b, t, -1), share)
        pending.clear()

    handles = [moe.register_forward_pre_hook(pre), moe.gate.register_forward_hook(on_gate),
               moe.register_forward_hook(post)]
    if moe.shared_experts is not None:
        handles.append(moe.shared_experts.register_forward_hook(on_shared))
    return handles


def check_length(model: nn.Module, n_tokens: int) -> None:
    """Prompts must fit the model context (and not be empty)."""
    ctx = int(model.config.max_position_embeddings)
    if n_tokens == 0:
        raise InspectError("empty prompt: give some text to inspect")
    if n_tokens > ctx:
        raise InspectError(f"the prompt is {n_tokens} tokens but the model context is {ctx}: shorten it")


@torch.no_grad()
def forward_with_capture(model: nn.Module, input_ids: torch.Tensor, routing: bool = True, attention: bool = True,
                         layers: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None):
    """`model(input_ids)` with routing/attention recorded: input_ids [B,T] -> (CausalLMOutput, Capture)."""
    check_length(model, input_ids.shape[1])
    with capture(model, routing=routing, attention=attention, layers=layers) as cap:
        out = model(input_ids.to(model.device), attention_mask=attention_mask)
    return out, cap
