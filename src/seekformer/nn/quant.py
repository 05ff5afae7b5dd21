"""Weight-only int8 / int4 layers: QuantLinear, QuantExperts, QuantEmbedding (pack, unpack, fast matmul).

Shapes: O output features, I input features, G group size, E experts, F expert width, D hidden, N tokens,
K experts per token, M rows.

  * int8 (per output channel, symmetric): qweight [O,I] int8, scales [O]: W = qweight * scales.
  * int4 (per group of G inputs, asymmetric): qweight [O,I/2] uint8 (two weights a byte, see
    nn/quant_kernels.py for the nibble order), scales and mins [O,I/G]: W = q * scales + mins, q in 0..15.
    The group's range is clipped where that lowers the squared error (a small grid search per group).

Few rows (decoding, M <= 8 per call, chunked above that... up to `FEW_ROWS`) go through the fused AVX2
kernels of nn/quant_kernels.py, which read the packed weight and never materialise it; more rows (prefill,
training-free evaluation) dequantize the weight once per call and use the fp32 GEMM. Experts only ever
touch the weights of experts some token routed to. An optional per-input `input_scale` [I] (activation-
aware scaling, AWQ style) divides x before the product: W x = (W diag(s)) (x / s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_kernels
from .moe import Experts

BITS = (8, 4)
# Rows up to this many use the fused kernels (in chunks of KERNEL_ROWS); more rows dequantize and GEMM.
FEW_ROWS = 16
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


# ====================================================================== pack / unpack
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [...,O,I] -> (qweight int8 [...,O,I], scales fp32 [...,O]); symmetric per output row."""
    w = w.float()
    scales = (w.abs().amax(-1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.unsqueeze(-1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [...,I] in 0..15 -> [...,I/2]: per block of 32, byte j = q[j] | q[j+16] << 4."""
    blocks = q.reshape(*q.shape[:-1], -1, 32)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2).contiguous()


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    blocks = p.reshape(*p.shape[:-1], -1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [...,O,I] -> (qweight uint8 [...,O,I/2], scales [...,O,I/G], mins [...,O,I/G]).

    Per group, the range [min, max] is shrunk by each factor of CLIP_GRID (towards the group's values,
    keeping 0 representable only as well as the range allows) and the one with the lowest squared error
    is kept.
    """
    *lead, o, i = w.shape
    g = w.float().reshape(*lead, o, i // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err = best = None
    for c in CLIP_GRID:
        mid = (lo + hi) / 2
        l, h = mid + (lo - mid) * c, mid + (hi - mid) * c
        s = ((h - l) / 15.0).clamp_min(1e-12)
        q = torch.round((g - l) / s).clamp_(0, 15)
        err = ((q * s + l - g) ** 2).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, (q, s, l)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, new, old) for new, old in zip((q, s, l), best))
    q, s, l = best
    packed = _pack_nibbles(q.to(torch.uint8).reshape(*lead, o, i))
    return packed, s.squeeze(-1).contiguous(), l.squeeze(-1).contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(packed).float()
    *lead, o, i = q.shape
    ng = scales.shape[-1]
    w = q.view(*lead, o, ng, i // ng) * scales.unsqueeze(-1) + mins.unsqueeze(-1)
    return w.view(*lead, o, i)


def check_group(in_features: int, group_size: int) -> int:
    """The group size used for `in_features` inputs: group_size if it divides them, else the largest
    multiple of 32 below it that does (ValueError if none)."""
    for g in range(min(group_size, in_features), 31, -32):
        if g % 32 == 0 and in_features % g == 0:
            return g
    raise ValueError(f"int4 needs an input width divisible by 32, got {in_features}")


# ====================================================================== the product
def _kernel_ok(x2: torch.Tensor) -> bool:
    return (x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] <= FEW_ROWS
            and not (torch.is_grad_enabled() and x2.requires_grad))


def qmatmul(x2: torch.Tensor, bits: int, qweight: torch.Tensor, scales: torch.Tensor,
            mins: torch.Tensor | None) -> torch.Tensor:
    """x2 [M,I] @ dequant(W)^T -> [M,O]; fused kernel for few fp32 CPU rows, else dequantize + GEMM."""
    if x2.shape[0] == 0:
        return x2.new_zeros(0, qweight.shape[0])
    lib = quant_kernels.kernels() if _kernel_ok(x2) else None
    if lib is not None and (bits == 4 or x2.shape[1] % 8 == 0):
        x2 = x2.contiguous()
        step = quant_kernels.KERNEL_ROWS
        parts = [quant_kernels.int8_linear(lib, c, qweight, scales) if bits == 8
                 else quant_kernels.int4_linear(lib, c, qweight, scales, mins) for c in x2.split(step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    w = dequantize_int8(qweight, scales) if bits == 8 else dequantize_int4(qweight, scales, mins)
    return F.linear(x2, w.to(x2.dtype))


class _Packed(nn.Module):
    """Shared pack/unpack of one quantized weight held as buffers `qweight`, `scales`, `mins` (int4)."""

    bits: int

    def _set(self, w: torch.Tensor, bits: int, group_size: int) -> None:
        self.bits = bits
        if bits == 8:
            q, s = quantize_int8(w)
            m = None
        else:
            q, s, m = quantize_int4(w, group_size)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.register_buffer("mins", m)


class QuantLinear(_Packed):
    """A weight-only quantized nn.Linear: forward(x [...,I]) -> [...,O] == F.linear(x, W, b) up to rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int = 64,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        if input_scale is not None:
            w = w * input_scale.float()
        self.group_size = check_group(self.in_features, group_size) if bits == 4 else 0
        self._set(w, bits, self.group_size)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, bits: int, group_size: int,
              input_scale: bool = False) -> QuantLinear:
        """A placeholder of the right shapes (filled by load_state_dict)."""
        return cls(torch.zeros(out_features, in_features), torch.zeros(out_features) if bias else None, bits,
                   group_size, torch.ones(in_features) if input_scale else None)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [O,I] these integers stand for (input scaling undone)."""
        w = dequantize_int8(self.qweight, self.scales) if self.bits == 8 else \
            dequantize_int4(self.qweight, self.scales, self.mins)
        return w / self.input_scale if self.input_scale is not None else w

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (a fresh fp32 tensor: slow, for code that needs the matrix itself)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            x2 = x2 / self.input_scale
        y = qmatmul(x2, self.bits, self.qweight, self.scales, self.mins)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


class QuantEmbedding(nn.Module):
    """int8 rows (one scale per token row): forward(ids [...]) -> [...,D]; `as_linear()` for a tied head."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, s = quantize_int8(weight.detach())
        self.num_embeddings, self.embedding_dim = weight.shape
        self.bits = 8
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * F.embedding(ids, self.scales.unsqueeze(-1))

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)


class QuantExperts(nn.Module):
    """Quantized `nn.moe.Experts`: the stacked gate_up [E,2F,D] and down [E,D,F] weights as int8 / int4.

    Buffers `gate_up_proj_{qweight,scales,mins}` and `down_proj_{qweight,scales,mins}` (leading dim E);
    checkpoint.py writes them per expert (`experts.E.{gate,up,down}_proj.{qweight,scales,mins}`).
    """

    PROJS = ("gate_up_proj", "down_proj")

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, bits: int, group_size: int = 64) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        self.bits = bits
        self.num_experts = gate_up.shape[0]
        self.group_size = {}
        for name, w in zip(self.PROJS, (gate_up, down)):
            w = w.detach().float()
            if bits == 8:
                q, s = quantize_int8(w)
                m = None
            else:
                self.group_size[name] = check_group(w.shape[-1], group_size)
                q, s, m = quantize_int4(w, self.group_size[name])
            self.register_buffer(f"{name}_qweight", q)
            self.register_buffer(f"{name}_scales", s)
            self.register_buffer(f"{name}_mins", m)

    @classmethod
    def empty(cls, num_experts: int, hidden: int, width: int, bits: int, group_size: int) -> QuantExperts:
        return cls(torch.zeros(num_experts, 2 * width, hidden), torch.zeros(num_experts, hidden, width), bits,
                   group_size)

    def _proj(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        m = getattr(self, f"{name}_mins")
        return qmatmul(x, self.bits, getattr(self, f"{name}_qweight")[e], getattr(self, f"{name}_scales")[e],
                       None if m is None else m[e])

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows: x [M,D] -> [M,D] (SwiGLU)."""
        gate, up = self._proj("gate_up_proj", e, x).chunk(2, dim=-1)
        return self._proj("down_proj", e, F.silu(gate) * up)

    def dequantize(self, name: str, e: int) -> torch.Tensor:
        """fp32 weight of projection `name` of expert e."""
        m = getattr(self, f"{name}_mins")
        q, s = getattr(self, f"{name}_qweight")[e], getattr(self, f"{name}_scales")[e]
        return dequantize_int8(q, s) if self.bits == 8 else dequantize_int4(q, s, m[e])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N,D], indices/weights [N,K] -> [N,D]: each routed expert once on the rows that chose it."""
        n, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x.index_select(0, token)
        gate_w = weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        parts = []
        for e, xe in enumerate(xs.split(counts)):
            if xe.shape[0]:  # experts no token routed to are never read
                parts.append(self.expert_forward(e, xe))
        ys = torch.cat(parts) * gate_w if parts else xs.new_zeros(0, x.shape[1])
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


# ====================================================================== whole models
def quant_spec(bits: int, group_size: int = 64, embeddings: bool = True, lm_head: bool = True,
               skip: tuple[str, ...] = ("kv_b_proj",)) -> dict:
    """The `quantization_config` a quantized model's config.json records."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return {"quant_method": "seekformer", "bits": bits, "group_size": group_size if bits == 4 else None,
            "embeddings": embeddings, "lm_head": lm_head, "skip": list(skip)}


def _targets(model: nn.Module, spec: dict):
    """(parent, attribute, module) of every module `spec` quantizes."""
    skip = tuple(spec.get("skip") or ())
    out = []
    for name, mod in model.named_modules():
        for attr, child in mod.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, Experts):
                out.append((mod, attr, child))
            elif type(child) is nn.Linear:
                if attr in skip or (full == "lm_head" and not spec.get("lm_head", True)):
                    continue
                out.append((mod, attr, child))
            elif type(child) is nn.Embedding and spec.get("embeddings", True):
                out.append((mod, attr, child))
    return out


@torch.no_grad()
def quantize_modules_(model: nn.Module, spec: dict, empty: bool = False,
                      input_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace the Linear / Experts / Embedding modules `spec` names by quantized ones, in place.

    `empty=True` builds placeholders of the right shapes (for loading a quantized checkpoint onto a model
    built on the meta device). `input_scales` maps id(linear) -> per-input scale [I] (activation-aware).
    """
    bits, group = spec["bits"], spec.get("group_size") or 64
    input_scales = input_scales or {}
    for parent, attr, child in _targets(model, spec):
        if isinstance(child, nn.Embedding):
            new = QuantEmbedding(torch.zeros(child.weight.shape) if empty else child.weight)
        elif isinstance(child, nn.Linear):
            has_bias = child.bias is not None
            if empty:
                new = QuantLinear.empty(child.out_features, child.in_features, has_bias, bits, group,
                                        input_scale=bool(spec.get("awq")))
            else:
                s = input_scales.get(id(child))
                if s is None and spec.get("awq"):
                    s = torch.ones(child.in_features)
                new = QuantLinear(child.weight, child.bias, bits, group, s)
        else:
            e, two_f, d = child.gate_up_proj.shape
            new = (QuantExperts.empty(e, d, two_f // 2, bits, group) if empty
                   else QuantExperts(child.gate_up_proj, child.down_proj, bits, group))
        setattr(parent, attr, new)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantExperts, QuantEmbedding)) for m in model.modules())
