"""RMSNorm, computed in fp32 like DeepSeek-V3 and `transformers`, with a hand-written backward.

y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype). Autograd through the plain formula makes about ten
passes over x in backward; the fused backward below makes five, which matters on a CPU where the norms of a
small model cost as much as its attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import plain


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        r = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)  # [...,1]
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        n = x.float() * r  # normalised x [...,D] (fp32)
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        gn = (gy * weight).float()  # dL/dn
        # dn/dx = r (I - n n^T / D): dx = r * (gn - n * mean(gn * n))
        dot = (gn * n).mean(-1, keepdim=True)
        gx = gn.sub_(n.mul_(dot)).mul_(r)
        return gx.to(x.dtype), gw, None


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps); x [..., D] -> y [..., D], normalised in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) and not plain.enabled():
            return _RMSNormFn.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """`norm(x)` without gradients through torch's fused kernel (fp32 statistics, then weight): decoding."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), eps=norm.eps) * norm.weight
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype) * norm.weight
