"""`F.linear` for a few rows against a large weight (the products of a decoding step), faster on CPU.

Decoding multiplies 1 to a few dozen token vectors by every weight matrix. In torch's CPU build (MKL
sgemm/sgemv, fp32) `F.linear(x, W)` with so few rows streams W at about 10 GB/s on the development
machine, while the same product written as `W @ X^T` — the rows of x as a narrow right-hand side, at least
two of them — runs 2-5x faster (measured on the weight shapes of the `tiny` and `small` presets and the
quickstart model, cold caches: e.g. a 16384 x 512 output head, 3.3 ms -> 1.2-1.4 ms per token at 1 and 2
rows). A single row is therefore duplicated: the extra column costs arithmetic, not memory traffic, and a
decoding step is bound by memory traffic.

Only the no-gradient fp32 CPU case takes this path; everything else (training, bf16, GPU) is `F.linear`.

Whether it pays depends on the CPU and its BLAS: on other machines of the same kind (an Intel Xeon) the
form was a net loss, and even here hot-cache micro-benchmarks favour F.linear. `use(False)` switches it
off for a block (`with few_rows.use(flag): ...`); the decoders measure both on the model's own decoding
step and keep the faster one (`inference.decoding.few_rows_choice`, `runtime.set_product_form`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Up to this many rows the W @ X^T form was faster in every measured shape (1.1-1.4x at 32 rows, 2-5x at 2).
FEW_ROWS = 32
# ... for weights with at least this many output rows; inside a decoding step (other weights evicting the
# caches) narrower ones (512 x 512, 512 x 1024, 256 x 512) gained nothing.
MIN_OUT = 1024
_enabled = True  # switched per block by `use`
_from_rows: int | None = None  # with this many rows or more, the W @ X^T form for every weight (`use`)
# Inside a graph being captured by torch.compile, products of at most this many rows (a static count) are
# written as a broadcast multiply and a sum over the input dimension: inductor generates one vectorised
# reduction that streams the weight once, ~1.1-2x the extern mm (MKL) on the development VM, where MKL's
# one-row products stream weights at ~10 GB/s (F.linear) or ~17 GB/s (W @ X^T) and the reduction at ~21
# (in-graph micro-benchmark, cold weights, 1 thread). Eager code never takes it (it would materialise W * x).
_reduce_rows = 1


class use:
    """Context manager: few_rows_linear takes its W @ X^T form inside the block only if `flag` (None: as is);
    `from_rows` (None: as is), products of at least that many (<= FEW_ROWS) rows take it whatever the flag
    and the weight's size (MKL's small-M sgemm is slow: on the development VM 4 rows by a 4096 x 256
    weight cost 5.9x one row as F.linear, 3.0x in the W @ X^T form)."""

    def __init__(self, flag: bool | None, from_rows: int | None = None, reduce_rows: int | None = None) -> None:
        self.flag, self.from_rows, self.reduce_rows, self.before = flag, from_rows, reduce_rows, None

    def __enter__(self) -> None:
        global _enabled, _from_rows, _reduce_rows
        self.before = (_enabled, _from_rows, _reduce_rows)
        if self.flag is not None:
            _enabled = bool(self.flag)
        if self.from_rows is not None:
            _from_rows = int(self.from_rows)
        if self.reduce_rows is not None:
            _reduce_rows = int(self.reduce_rows)

    def __exit__(self, *exc) -> None:
        global _enabled, _from_rows, _reduce_rows
        _enabled, _from_rows, _reduce_rows = self.before


def enabled() -> bool:
    """Whether few_rows_linear currently takes its W @ X^T form where it applies."""
    return _enabled


def reduces(rows) -> bool:
    """Whether a product of `rows` rows (a static count) is being captured by torch.compile and should be
    written as a broadcast multiply and a sum (`_reduce_rows`): one generated kernel instead of an extern
    call to MKL (each extern mm/bmm call costs ~10-20 us in the captured step, plus its buffers)."""
    return type(rows) is int and 0 < rows <= _reduce_rows and torch.compiler.is_compiling()


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """== F.linear(x, weight, bias) for x [..., I] and weight [O, I] (same values up to fp32 rounding)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    m = rows.shape[0]
    if reduces(m):
        y = (rows[:, None, :] * weight).sum(-1)  # [m, O]: one generated reduction, W read once per row
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    many = _from_rows is not None and _from_rows <= m <= FEW_ROWS
    if not many and (not _enabled or m == 0 or m > FEW_ROWS or weight.shape[0] < MIN_OUT):
        return F.linear(x, weight, bias)
    rows = (rows.expand(2, d) if m == 1 else rows).contiguous()
    y = torch.mm(weight, rows.t())  # [O, max(m, 2)]
    y = y[:, :m].t().contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_of(layer, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for an nn.Linear through few_rows_linear; any other module (e.g. a LoRA-wrapped Linear)
    runs its own forward."""
    if type(layer) is not torch.nn.Linear:
        return layer(x)
    return few_rows_linear(x, layer.weight, layer.bias)

