"""Per-example gradients from ONE batched forward/backward, by layer rules (the `hooks` strategy).

Opacus' idea (GradSampleModule), written for the layers our trainable parameters live in, so that the
default DP method (LoRA through peft, adapters on attention, MLPs and the stacked routed experts) needs no
per-example loop. Each rule records a layer's input rows x and, through a tensor hook, the gradient g of
its output rows, and forms every example's gradient from the rows of that example:

- `nn.Linear` called as a module (attention LoRA factors `lora_A/lora_B`, task heads, any plain Linear whose
  weight or bias trains): dW_b = sum_t g_bt x_bt^T, db_b = sum_t g_bt.
- peft `ParamWrapper` on a Linear's weight (adapters on the dense and shared MLPs): W = W0 + s B A, so
  dB_b = s sum_t g_bt (A x_bt)^T and dA_b = s sum_t (B^T g_bt) x_bt^T (rank-r projections first: cheap).
- RMSNorm weights: dw_b = sum_t g_bt * n_bt (n the normalised input); the router's weight (logits = x W^T);
  embeddings (g_bt added at example b's token ids); the stacked experts' own weights in full fine-tuning
  (sum of g x^T over each (example, expert) run of the sorted token copies).
- peft `ParamWrapper` on the stacked experts (`gate_up_proj` [E,2F,D], `down_proj` [E,D,F]): peft's factors
  W[e] = W0[e] + s lhs[e] rhs[e]; the rows are the token copies sorted by expert (`Experts.row_tap`), each
  row's example is its token's batch row; the same two rules per expert, summed per (example, expert), then
  mapped onto `lora_A/lora_B` by autograd through peft's reshapes (`is_grads_batched`).

Exactness: the batched loss must be the SUM of per-example losses with no term coupling examples. That holds
for the classification loss (mean over examples, times B), the sequence-wise balance loss (a mean over
sequences) and routing (per token, no capacity limit). Padding rows get zero gradient (causal attention,
masked pooling). The router z-loss (a mean over all tokens of the batch) does not decompose: callers fall back
to the loop when it is on. A trainable parameter no rule covers raises `Uncovered`, and so does one whose per-example gradients
do not add up to autograd's batch gradient (a use outside the rules, e.g. a weight read directly by a fused
loss): callers fall back to another strategy.
Tested against per-example backward passes (tests/test_privacy.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class Uncovered(RuntimeError):
    """A trainable parameter that no rule here can give per-example gradients for."""


class _Rows:
    """One layer call's input rows [B,*,I] and (after backward) its output gradient rows [B,*,O]."""

    def __init__(self) -> None:
        self.calls: list[list[torch.Tensor | None]] = []

    def record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not y.requires_grad:
            return
        call: list[torch.Tensor | None] = [x.detach(), None]
        self.calls.append(call)
        y.register_hook(lambda g: call.__setitem__(1, g.detach()))

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, g in self.calls:
            if g is not None:
                yield x, g


def _rows_per_example(t: torch.Tensor, b: int) -> torch.Tensor:
    """[B,...,C] -> [B,R,C] (a layer called on [B,T,C] or on pooled [B,C])."""
    return t.reshape(b, -1, t.shape[-1])


class _LinearRule:
    """Per-example grads of an nn.Linear's own weight/bias."""

    def __init__(self, m: nn.Linear) -> None:
        self.m, self.rows = m, _Rows()
        self.params = [p for p in (m.weight, m.bias) if p is not None and p.requires_grad]
        self.handle = m.register_forward_hook(lambda mod, inp, out: self.rows.record(inp[0], out))

    def grads(self, b: int) -> dict[int, torch.Tensor]:
        w = self.m.weight.new_zeros(b, *self.m.weight.shape)
        bias = self.m.bias.new_zeros(b, *self.m.bias.shape) if self.m.bias is not None else None
        for x, g in self.rows.pairs():
            x, g = _rows_per_example(x, b).to(w.dtype), _rows_per_example(g, b).to(w.dtype)
            w += torch.einsum("bro,bri->boi", g, x)
            if bias is not None:
                bias += g.sum(1)
        out = {}
        if self.m.weight.requires_grad:
            out[id(self.m.weight)] = w
        if bias is not None and self.m.bias.requires_grad:
            out[id(self.m.bias)] = bias
        return out


class _WeightRule:
    """A rule for a module's `weight`: records (input, output) rows at each call (`out` picks the output)."""

    def __init__(self, m: nn.Module, out: Callable = lambda y: y) -> None:
        self.m, self.rows = m, _Rows()
        self.params = [m.weight]
        self.handle = m.register_forward_hook(lambda mod, inp, y: self.rows.record(inp[0], out(y)))


class _NormRule(_WeightRule):
    """Per-example grads of an RMSNorm weight: dw_b = sum_t g_bt * n_bt (n: the normalised input)."""

    def grads(self, b: int) -> dict[int, torch.Tensor]:
        w = self.m.weight.new_zeros(b, *self.m.weight.shape)
        for x, g in self.rows.pairs():
            x32 = _rows_per_example(x, b).float()
            n = (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.m.eps)).to(x.dtype)
            w += (_rows_per_example(g, b) * n).sum(1).to(w.dtype)
        return {id(self.m.weight): w}


class _RouterRule(_WeightRule):
    """Per-example grads of the router's weight (logits = x W^T in fp32, on the flattened tokens)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__(m, lambda out: out.logits)

    def grads(self, b: int) -> dict[int, torch.Tensor]:
        w = self.m.weight.new_zeros(b, *self.m.weight.shape)
        for x, g in self.rows.pairs():
            w += torch.einsum("bro,bri->boi", _rows_per_example(g, b), _rows_per_example(x, b).float()).to(w.dtype)
        return {id(self.m.weight): w}


class _EmbeddingRule(_WeightRule):
    """Per-example grads of an embedding table: example b's output gradients added at its token ids.
    Dense [B,V,D] per chunk: fine for small vocabularies, heavy for large ones."""

    def grads(self, b: int) -> dict[int, torch.Tensor]:
        w = self.m.weight.new_zeros(b, *self.m.weight.shape)
        for ids, g in self.rows.pairs():
            ids, g = ids.reshape(b, -1), _rows_per_example(g, b).to(w.dtype)
            w.scatter_add_(1, ids[:, :, None].expand(-1, -1, g.shape[-1]), g)
        return {id(self.m.weight): w}


def _factor_grads(lhs: torch.Tensor, rhs: torch.Tensor, s: float, x: torch.Tensor, g: torch.Tensor,
                  counts: torch.Tensor, seg: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment grads of W[e] = W0[e] + s lhs[e] rhs[e] (lhs [E,O,r], rhs [E,r,I]) used as y = x W[e]^T on
    rows grouped by expert (x [S,I], g [S,O], counts [E]); seg [S] is each row's segment (example, expert)
    -> (dlhs [n_seg,O,r], drhs [n_seg,r,I]). Rank-r projections first: z = rhs x, u = lhs^T g."""
    from ...nn.moe import Experts

    z = Experts.grouped_linear(x, counts, rhs.contiguous())  # [S,r]
    u = Experts.grouped_linear(g, counts, lhs.transpose(1, 2).contiguous())  # [S,r]
    dlhs = x.new_zeros(n_seg, lhs.shape[1], lhs.shape[2]).index_add_(0, seg, g[:, :, None] * z[:, None, :])
    drhs = x.new_zeros(n_seg, rhs.shape[1], rhs.shape[2]).index_add_(0, seg, u[:, :, None] * x[:, None, :])
    return dlhs * s, drhs * s


def _to_params(outputs: list[torch.Tensor], grads: list[torch.Tensor], params: list[nn.Parameter]
               ) -> dict[int, torch.Tensor]:
    """Map per-example grads [B,*out.shape] of differentiable views `outputs` of `params` onto the params."""
    got = torch.autograd.grad(outputs, params, grad_outputs=grads, is_grads_batched=True, allow_unused=True)
    return {id(p): (gp if gp is not None else p.new_zeros(grads[0].shape[0], *p.shape)) for p, gp in zip(params, got)}


class _WrappedLinearRule:
    """peft ParamWrapper on a 2-D Linear weight: W = W0 + s B A (fan_in_fan_out False)."""

    def __init__(self, wrapper: nn.Module, adapter: str) -> None:
        self.w, self.adapter, self.rows = wrapper, adapter, _Rows()
        base = wrapper.get_base_layer()
        self.handle = base.register_forward_hook(lambda mod, inp, out: self.rows.record(inp[0], out))
        self.a, self.b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight  # [r,I], [O,r]
        self.params = [p for p in (self.a, self.b) if p.requires_grad]

    def grads(self, b: int) -> dict[int, torch.Tensor]:
        """`_factor_grads` with one "expert" (lhs = B, rhs = A) and each example's rows as its segment."""
        s = float(self.w.scaling[self.adapter])
        da, db = self.a.new_zeros(b, *self.a.shape), self.b.new_zeros(b, *self.b.shape)
        for x, g in self.rows.pairs():
            x, g = x.reshape(-1, x.shape[-1]).to(da.dtype), g.reshape(-1, g.shape[-1]).to(da.dtype)
            seg = torch.arange(x.shape[0], device=x.device) // (x.shape[0] // b)  # row -> example
            counts = torch.tensor([x.shape[0]], device=x.device)
            dl, dr = _factor_grads(self.b.detach()[None], self.a.detach()[None], s, x, g, counts, seg, b)
            db += dl
            da += dr
        return {id(self.a): da, id(self.b): db}


class _ExpertsRule:
    """peft ParamWrappers on an Experts module's stacked weights (see the module docstring)."""

    def __init__(self, experts: nn.Module, wrappers: dict[str, tuple[nn.Module, str]], seq_len: int) -> None:
        self.experts, self.wrappers, self.t = experts, wrappers, seq_len
        self.calls: list[dict] = []
        self.params = [p for w, ad in wrappers.values() for p in (w.lora_A[ad].weight, w.lora_B[ad].weight)
                       if p.requires_grad]
        # full fine-tuning: the stacked weights themselves (not adapted here, so plain Parameters)
        self.own = {}
        for n in ("gate_up_proj", "down_proj"):
            p = experts._parameters.get(n)
            if n not in wrappers and isinstance(p, nn.Parameter) and p.requires_grad:
                self.own[n] = p
        self.params += list(self.own.values())
        experts.row_tap = self._tap

    def _tap(self, d, xs, gu, act, out) -> None:
        if not out.requires_grad:
            return
        call = {"token": d.token, "counts": d.counts, "x": {"gate_up_proj": xs.detach(), "down_proj": act.detach()},
                "g": {}}
        self.calls.append(call)
        gu.register_hook(lambda g: call["g"].__setitem__("gate_up_proj", g.detach()))
        out.register_hook(lambda g: call["g"].__setitem__("down_proj", g.detach()))

    def remove(self) -> None:
        self.experts.row_tap = None

    def _rows(self, name: str):
        """(x [S,I], g [S,O], counts [E], seg [S] = example * E + expert) of every call that saw gradients."""
        e_n = self.experts.num_experts
        for c in self.calls:
            if name in c["g"]:
                expert = torch.repeat_interleave(torch.arange(e_n, device=c["token"].device), c["counts"])  # [S]
                yield c["x"][name], c["g"][name], c["counts"], (c["token"] // self.t) * e_n + expert

    def grads(self, b: int) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        e_n = self.experts.num_experts
        for name, p in self.own.items():  # segments (example, expert) are contiguous runs of the sorted rows
            dw = p.new_zeros(b * e_n, *p.shape[1:])
            for x, g, _, seg in self._rows(name):
                ids, runs = torch.unique_consecutive(seg, return_counts=True)
                for i, xs, gs in zip(ids.tolist(), x.split(runs.tolist()), g.split(runs.tolist())):
                    dw[i] += (gs.T @ xs).to(dw.dtype)
            out[id(p)] = dw.view(b, *p.shape)
        for name, (w, ad) in self.wrappers.items():
            a, bw = w.lora_A[ad].weight, w.lora_B[ad].weight
            with torch.enable_grad():
                lhs, rhs, s = w.get_delta_factors(ad)  # [E,O,r], [E,r,I]: differentiable views of A, B
            dl, dr = lhs.new_zeros(b * e_n, *lhs.shape[1:]), rhs.new_zeros(b * e_n, *rhs.shape[1:])
            for x, g, counts, seg in self._rows(name):
                l_, r_ = _factor_grads(lhs.detach(), rhs.detach(), float(s), x.to(dl.dtype), g.to(dl.dtype), counts,
                                       seg, b * e_n)
                dl += l_
                dr += r_
            got = _to_params([lhs, rhs], [dl.view(b, *lhs.shape), dr.view(b, *rhs.shape)],
                             [p for p in (a, bw) if p.requires_grad])
            out.update(got)
        return out


@contextmanager
def recording(model: nn.Module, params: list[nn.Parameter], seq_len: int) -> Iterator[Callable[[int], list]]:
    """Attach the rules for `params` (raises Uncovered when one is not covered); yields `grads(B)` ->
    per-example gradients [B,*p.shape] in `params` order, valid after one forward/backward of a [B,seq_len]
    batch. The rules detach on exit."""
    from peft.tuners.lora.layer import ParamWrapper

    from ...nn.moe import Experts, Router
    from ...nn.norm import RMSNorm

    rules: list = []
    experts: dict[int, tuple[nn.Module, dict]] = {}
    for m in model.modules():
        if isinstance(m, ParamWrapper):
            (ad,) = [a for a in m.active_adapters if a in m.lora_A]
            base = m.get_base_layer()
            if isinstance(base, Experts):
                experts.setdefault(id(base), (base, {}))[1][m.parameter_name] = (m, ad)
            elif isinstance(base, nn.Linear) and m.parameter_name == "weight" and not m.fan_in_fan_out:
                rules.append(_WrappedLinearRule(m, ad))
    for m in model.modules():  # experts trained in full (no adapter on them)
        if isinstance(m, Experts) and id(m) not in experts and any(p.requires_grad for p in m.parameters(False)):
            experts[id(m)] = (m, {})
    for base, wrappers in experts.values():
        rules.append(_ExpertsRule(base, wrappers, seq_len))
    for m in model.modules():
        kind = {RMSNorm: _NormRule, Router: _RouterRule, nn.Embedding: _EmbeddingRule}.get(type(m))
        if kind is not None and m.weight.requires_grad:
            rules.append(kind(m))
    covered = {id(p) for r in rules for p in r.params}
    for m in model.modules():
        if isinstance(m, nn.Linear) and not nn.utils.parametrize.is_parametrized(m) and any(p is not None and p.requires_grad and id(p) not in covered
                                             for p in (m.weight, m.bias)):
            rules.append(_LinearRule(m))
            covered |= {id(p) for p in rules[-1].params}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered
               and any(p is q for q in params)]

    names = {id(p): n for n, p in model.named_parameters()}

    def grads(b: int) -> list[torch.Tensor]:
        by_id: dict[int, torch.Tensor] = {}
        for r in rules:
            by_id.update(r.grads(b))
        out = [by_id[id(p)] for p in params]
        for p, g in zip(params, out):  # the examples' gradients must add up to the batch's (autograd's own)
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            if not torch.allclose(g.sum(0), ref, rtol=1e-3, atol=1e-5 * (1.0 + float(ref.abs().max()))):
                raise Uncovered(f"the per-example gradients of {names.get(id(p), '?')} do not add up to the batch "
                                "gradient (the parameter is used outside the layer rules)")
        return out

    try:
        if missing:
            raise Uncovered(f"no per-example rule for {missing[0]} (and {len(missing) - 1} more)")
        yield grads
    finally:
        for r in rules:
            if isinstance(r, _ExpertsRule):
                r.remove()
            else:
                r.handle.remove()


__all__ = ["Uncovered", "recording"]
