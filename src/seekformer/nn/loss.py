"""Cross-entropy over a large vocabulary, fused: one softmax buffer serves forward and backward.

`F.cross_entropy` keeps log-softmax for the backward pass and rebuilds the gradient from it with several
passes over the [N, V] tensor. Here the forward pass keeps softmax(logits) (fp32) and the backward turns
it into the gradient in place: p - onehot(target), scaled by the upstream gradient / number of targets.
Same result, about half the memory traffic, which is what a CPU training step of a small model is bound by.
"""

from __future__ import annotations

import torch

from . import plain


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = target != ignore_index  # [N]
        tgt = torch.where(valid, target, 0)
        n = valid.sum().clamp_min(1).to(torch.float32)
        x = logits.float()  # (softmax(dtype=float32) on bf16 input is a slow scalar path on CPU)
        p = torch.softmax(x, dim=-1)  # [N,V] fp32, one fused pass; kept for backward
        # log-sum-exp from the largest probability (>= 1/V, so no underflow): lse = max(x) - log(max(p))
        lse = x.amax(dim=-1) - p.amax(dim=-1).log()  # [N]
        picked = x.gather(1, tgt.unsqueeze(1)).squeeze(1)
        loss = ((lse - picked) * valid).sum() / n
        ctx.save_for_backward(p, tgt, valid, n)
        ctx.logits_dtype = logits.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.used:
            raise RuntimeError("fused cross_entropy: backward can run only once (retain_graph is not supported)")
        ctx.used = True
        p, tgt, valid, n = ctx.saved_tensors
        p.scatter_add_(1, tgt.unsqueeze(1), torch.full((p.shape[0], 1), -1.0, dtype=p.dtype, device=p.device))
        p.mul_((valid.to(p.dtype) * (grad / n)).unsqueeze(1))  # ignored rows get 0
        return p.to(ctx.logits_dtype), None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits [N,V] against target [N] (entries equal to `ignore_index` skipped).

    Equals `F.cross_entropy(logits.float(), target, ignore_index=ignore_index)`, except that a batch with no
    target gives 0 instead of NaN.
    """
    if not logits.requires_grad or not torch.is_grad_enabled() or plain.enabled():
        valid = target != ignore_index
        lse = torch.logsumexp(logits.float(), dim=-1)
        picked = logits.float().gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        return ((lse - picked) * valid).sum() / valid.sum().clamp_min(1)
    return _FusedCrossEntropy.apply(logits, target, ignore_index)
