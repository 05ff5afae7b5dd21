"""Per-example clipped gradient sums: sum_i g_i * min(1, C / ||g_i||) over a batch, exact.

Three ways to get the per-example gradients g_i (the trainable parameters' gradient of example i's loss):

- `hooks`: ONE batched forward/backward; layer rules form every example's gradient from its rows of each
  layer's inputs and output gradients (grad_sample.py: Linear, peft's LoRA on Linears, MLP weights and the
  stacked routed experts). For losses that are a sum over examples (classification) and trainable
  parameters the rules cover (LoRA, heads): the fast path of the DP default.

- `loop`: one forward/backward per example, cut to its own length (no padding), through the model's
  ordinary fast paths. Exact for every layer, task type and training method (full, LoRA via peft,
  frozen), at the cost of B small backward passes.
- `vmap`: `torch.func.vmap(grad(loss))` over the batch under `nn.plain.plain_autograd()` (plain ops in
  RMSNorm, cross-entropy and the routed experts, see nn/plain.py); one batched pass, for task types whose
  loss `vmap_loss` provides (classification). Processed in chunks to bound the [B, P] gradient memory.

Opacus' GradSampleModule is not used for the gradients: it has no per-sample rule for RMSNorm, the
router's F.linear on its own weight, the stacked expert tensors [E,2F,D] or peft's expert adapters, and its
functorch fallback needs the same plain ops as `vmap` here. All three are tested against per-example
backward passes (tests/test_privacy.py). `auto` takes hooks where it applies and the per-example gradients
of a chunk are small (LoRA, heads), else the loop. Loads: each example's expert-load fractions per MoE layer,
counts / tokens ([L,E], each row sums to K), are returned summed for the DP balancing update.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / ||g||) (Opacus' convention, with a 1e-6 guard)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def trim(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Example i of a right-padded collated batch as a batch of one, cut to its own length."""
    n = int(batch["attention_mask"][i].sum())
    out = {}
    for k, v in batch.items():
        row = v[i: i + 1]
        out[k] = row[:, :n] if row.dim() == 2 and row.shape[1] == batch["attention_mask"].shape[1] else row
    return out


HOOKS_AUTO_MAX_FLOATS = 2 ** 24  # per_sample auto takes hooks while chunk_size * trainable parameters <= this


class PerSampleClipper:
    """Clipped per-example gradient sums for `params` (the trainable parameters) of `model`.

    `loss_of(batch) -> scalar loss` runs the model on a batch (the loop strategy calls it with one example);
    `strategy` is hooks, vmap, loop, or auto (hooks when it applies and the per-example gradients are
    small, else the loop; a strategy that raises is dropped for good and `fallback_reason` says why). `vmap_loss(batch) -> scalar` (optional) is the vmappable loss
    of one example whose tensors have a leading dimension of 1, padding included (see dp_sgd.py).
    `loss_sums_examples`: B * loss_of(batch) is the sum of the B examples' own losses (hooks needs it).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], max_grad_norm: float,
                 moe_layers: list[nn.Module] | None = None, strategy: str = "loop",
                 vmap_loss: Callable | None = None, chunk_size: int = 16, loss_sums_examples: bool = False) -> None:
        self.model, self.params, self.c = model, params, max_grad_norm
        self.moe = list(moe_layers or [])
        self.vmap_loss, self.chunk_size = vmap_loss, chunk_size
        # auto: hooks while a chunk's per-example gradients stay small (LoRA, heads); with millions of trainable
        # parameters (full fine-tuning) materialising [chunk, P] costs more than the loop's B backward passes
        # (benchmarks/privacy_per_sample.py); vmap only when asked (on CPU it is not faster than the loop)
        small = chunk_size * sum(p.numel() for p in params) <= HOOKS_AUTO_MAX_FLOATS
        order = [strategy] if strategy != "auto" else ["hooks"] * (loss_sums_examples and small) + ["loop"]
        self._order = order
        self.fallback_reason: str | None = None  # why `auto` dropped a strategy

    @property
    def strategy(self) -> str:
        """The strategy the next batch uses."""
        return self._order[0]

    def clipped_sum(self, batch: dict[str, torch.Tensor], loss_of: Callable
                    ) -> tuple[list[torch.Tensor], torch.Tensor | None, dict[str, float]]:
        """(sum_i clip(g_i) per parameter, summed load fractions [L,E] or None, stats) over the batch."""
        from ...errors import RecipeError
        from .grad_sample import Uncovered

        while True:
            try:
                if self.strategy == "hooks":
                    return self._hooks(batch, loss_of)
                if self.strategy == "vmap":
                    return self._vmap(batch)
                return self._loop(batch, loss_of)
            except (Uncovered, RuntimeError) as e:  # vmap: e.g. peft's parametrized expert adapters under grad()
                if len(self._order) == 1:
                    if self.strategy == "loop":
                        raise
                    raise RecipeError(f"privacy.per_sample {self.strategy} cannot run through these layers ("
                                      f"{str(e).splitlines()[0][:160]}); use per_sample: loop or auto") from None
                self.fallback_reason = f"{self.strategy}: {str(e).splitlines()[0][:200]}"
                self._order.pop(0)
                for p in self.params:
                    p.grad = None

    def _loop(self, batch, loss_of):
        total = [torch.zeros_like(p) for p in self.params]
        loads = torch.zeros(len(self.moe), self.moe[0].num_experts) if self.moe else None
        norms = []
        b = batch["input_ids"].shape[0]
        for i in range(b):
            one = trim(batch, i)
            for m in self.moe:
                m.load_counts.zero_()
            for p in self.params:
                p.grad = None
            loss_of(one).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            norms.append(float(norm))
            torch._foreach_add_(total, grads, alpha=float(clip_factor(norm, self.c)))
            if loads is not None:
                tokens = float(one["attention_mask"].sum())
                loads += torch.stack([m.load_counts.cpu() for m in self.moe]) / max(tokens, 1.0)
        for p in self.params:
            p.grad = None
        for m in self.moe:
            m.load_counts.zero_()
        return total, loads, _stats(norms, self.c)

    def _hooks(self, batch, loss_of):
        """One forward/backward per chunk of examples of similar length (sorted, each chunk cut to its longest)."""
        lengths = batch["attention_mask"].sum(1)
        order = lengths.argsort(descending=True)
        total = [torch.zeros_like(p) for p in self.params]
        loads = torch.zeros(len(self.moe), self.moe[0].num_experts) if self.moe else None
        norms: list[float] = []
        for s in range(0, len(order), self.chunk_size):
            rows = order[s: s + self.chunk_size]
            t = int(lengths[rows].max())
            chunk = {k: (v[rows, :t] if v.dim() == 2 and v.shape[1] == batch["attention_mask"].shape[1] else v[rows])
                     for k, v in batch.items()}
            part, part_loads, part_norms = self._hooks_chunk(chunk, loss_of)
            torch._foreach_add_(total, part)
            if loads is not None:
                loads += part_loads
            norms.extend(part_norms)
        return total, loads, _stats(norms, self.c)

    def _hooks_chunk(self, batch, loss_of):
        from .grad_sample import recording

        b, t = batch["input_ids"].shape
        routed: list[torch.Tensor] = []
        hooks = [m.gate.register_forward_hook(lambda mod, inp, out: routed.append(out.indices)) for m in self.moe]
        try:
            with recording(self.model, self.params, t) as grads:
                for p in self.params:
                    p.grad = None
                (loss_of(batch) * b).backward()
                g = grads(b)
        finally:
            for h in hooks:
                h.remove()
            for p in self.params:
                p.grad = None
            for m in self.moe:
                m.load_counts.zero_()
        norm = torch.stack([gi.reshape(b, -1).pow(2).sum(1) for gi in g]).sum(0).sqrt()  # [B]
        f = clip_factor(norm, self.c)
        total = [torch.einsum("b,b...->...", f.to(gi.dtype), gi) for gi in g]
        loads = _loads_of(routed, batch["attention_mask"], self.moe).cpu() if self.moe else None
        return total, loads, norm.tolist()

    def _vmap(self, batch):
        from torch.func import functional_call, grad, vmap

        from ...nn.plain import plain_autograd

        names = {id(p): "model." + n for n, p in self.model.named_parameters()}
        keys = [names[id(p)] for p in self.params]
        wrapper = _LossModule(self.model, self.vmap_loss)
        detached = {k: p.detach() for k, p in zip(keys, self.params)}
        routed: list[torch.Tensor] = []
        hooks = [m.gate.register_forward_hook(lambda mod, inp, out: routed.append(out.indices)) for m in self.moe]

        def loss_one(p, ex):
            routed.clear()
            one = {k: v.unsqueeze(0) for k, v in ex.items()}
            loss = functional_call(wrapper, p, (one,))
            aux = _loads_of(routed, one.get("attention_mask"), self.moe)
            return loss, aux

        total = [torch.zeros_like(p) for p in self.params]
        loads = torch.zeros(len(self.moe), self.moe[0].num_experts) if self.moe else None
        norms = []
        per_ex = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0), randomness="different")
        try:
            b = batch["labels"].shape[0]
            with plain_autograd():
                for s in range(0, b, self.chunk_size):
                    chunk = {k: v[s: s + self.chunk_size] for k, v in batch.items()}
                    g, load = per_ex(detached, chunk)
                    flat = [g[k].reshape(g[k].shape[0], -1) for k in keys]
                    norm = torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1)  # [b]
                    f = clip_factor(norm, self.c)
                    for t, k in zip(total, keys):
                        t += torch.einsum("b,b...->...", f.to(g[k].dtype), g[k])
                    norms.extend(norm.tolist())
                    if loads is not None:
                        loads += load.sum(0).cpu()
        finally:
            for h in hooks:
                h.remove()
        return total, loads, _stats(norms, self.c)


class _LossModule(nn.Module):
    """Wraps `model` so that torch.func.functional_call can run `loss(batch)` with substituted parameters."""

    def __init__(self, model: nn.Module, loss: Callable) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(batch)


def _loads_of(routed: list[torch.Tensor], mask_BT: torch.Tensor | None, moe: list[nn.Module]) -> torch.Tensor:
    """Expert-load fractions [L,E] of B examples, summed over the examples: each example's counts / its real
    tokens per layer, from the routers' chosen indices [B*T,K] (padding excluded)."""
    if not moe or mask_BT is None:
        return torch.zeros(0)
    m = mask_BT.float()  # [B,T]
    rows = []
    for idx in routed[: len(moe)]:  # [B*T,K]
        chosen = torch.zeros(idx.shape[0], moe[0].num_experts, device=idx.device).scatter(1, idx, 1.0)  # [B*T,E]
        per_ex = (chosen.view(*m.shape, -1) * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        rows.append(per_ex.sum(0))
    return torch.stack(rows)


def _stats(norms: list[float], c: float) -> dict[str, float]:
    if not norms:
        return {"examples": 0, "grad_norm_median": 0.0, "clipped_fraction": 0.0}
    t = torch.tensor(norms)
    return {"examples": len(norms), "grad_norm_median": float(t.median()),
            "clipped_fraction": float((t > c).float().mean())}


__all__ = ["PerSampleClipper", "clip_factor", "trim"]
