"""The plain-autograd seam: `with plain_autograd(): ...` makes the building blocks use ordinary torch ops.

Fast paths in nn/ use hand-written autograd Functions (RMSNorm, fused cross-entropy) and data-dependent
dispatch (routed experts sorted by expert and run with `torch._grouped_mm` or a loop over `counts.tolist()`).
Per-sample-gradient tools cannot see through them: `torch.func.vmap` has no batching rule for a custom
`autograd.Function` without `setup_context`/`vmap` staticmethods and cannot vmap data-dependent shapes, and
Opacus' hooks need plain modules. Under `plain_autograd()`:

- RMSNorm computes `weight * (x / sqrt(mean(x^2) + eps))` with autograd (same values, slower backward);
- `nn.loss.cross_entropy` is `F.cross_entropy` on fp32 logits (same values);
- `Experts.forward` runs every expert on every token and weights the results with a dense [N,E] gate
  matrix that is zero off the chosen experts (same values, E/K times the expert FLOPs, no sort/bincount,
  vmappable), and `MoE` does not accumulate `load_counts` in place (a per-sample caller counts loads
  itself, e.g. from a forward hook on `MoE.gate`).

The flag is a context variable (thread- and task-local); `enabled()` is what the blocks check.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_PLAIN = contextvars.ContextVar("seekformer_plain_autograd", default=False)


def enabled() -> bool:
    """Whether the current code runs under `plain_autograd()`."""
    return _PLAIN.get()


@contextlib.contextmanager
def plain_autograd(on: bool = True) -> Iterator[None]:
    """Use plain differentiable torch ops in RMSNorm, cross-entropy and the routed experts (see module doc)."""
    token = _PLAIN.set(on)
    try:
        yield
    finally:
        _PLAIN.reset(token)


__all__ = ["plain_autograd", "enabled"]
