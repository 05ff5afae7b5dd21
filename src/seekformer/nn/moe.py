"""DeepSeekMoE: shared experts plus fine-grained routed experts, with auxiliary-loss-free balancing.

Shapes: N tokens, D hidden, E routed experts, K experts per token, F expert width, G groups.

Routing (DeepSeek-V3, `topk_method="noaux_tc"`): s = sigmoid(x W^T) [N,E]; experts are *selected* on
s + b (b = `e_score_correction_bias`, fp32, never trained by the optimizer), first restricted to the
`topk_group` groups with the largest sum of their top-2 biased scores, then the top K; the gate weights
are the unbiased s of the chosen experts, normalised to sum to 1 (`norm_topk_prob`) and multiplied by
`routed_scaling_factor`. DeepSeek-V2 uses softmax scores and `greedy` / `group_limited_greedy` (group
score = max) selection, and (as in `transformers`) never normalises the gate weights. The
auxiliary-loss-free update b += gamma * sign(mean load - load) is applied by the trainer after each
optimizer step from the counts this module accumulates in `load_counts`.

Experts: dispatch -> grouped compute -> combine. The N*K token copies are sorted by expert once
(`Experts.dispatch`); one grouped GEMM (`torch._grouped_mm`) per projection runs every expert on its
contiguous block (`compute`; a per-expert loop of GEMMs where torch has no grouped kernel), and the results
are summed back per token with index_add (`combine`): no per-token loop and no expert computed on tokens
that did not choose it. Decoding a few tokens (`MoE.step`) runs only the chosen experts
(`Experts.expert_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import plain
from .few_rows import few_rows_linear
from .mlp import MLP


@dataclass
class Routing:
    """The router's decision for N tokens."""

    weights: torch.Tensor  # [N,K] gate weights (fp32)
    indices: torch.Tensor  # [N,K] chosen experts
    scores: torch.Tensor  # [N,E] sigmoid/softmax scores (fp32, unbiased)
    logits: torch.Tensor  # [N,E] raw router logits (fp32)


class Router(nn.Module):
    """Scores, group-limited top-K selection and gate weights; names follow `DeepseekV3TopkRouter`."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Module dtype casts (`.to(bfloat16)`, `.half()`) leave the correction bias in fp32."""
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.is_floating_point() and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N,D] -> Routing. Routing runs in fp32, also under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x)

    def _route(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        else:
            choice = scores
        if self.n_group > 1 and self.topk_method != "greedy":
            n = choice.shape[0]
            grouped = choice.view(n, self.n_group, self.num_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N,G]
            else:
                group_scores = grouped.max(dim=-1).values
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, self.num_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        # V3 (sigmoid) normalises when norm_topk_prob is set; V2 (softmax) never does, as in `transformers`.
        if self.norm_topk_prob and self.scoring_func == "sigmoid":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return Routing(weights, indices, scores, logits)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` has a kernel for these operands (else the per-expert loop is used)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":  # CPU kernel since torch 2.9 (fp32/bf16); older builds need 16-byte alignment
        return x.dtype in (torch.float32, torch.bfloat16) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


@dataclass
class Dispatch:
    """N tokens' K expert copies sorted by expert: S = N*K rows, expert e owning a contiguous block of counts[e]."""

    x: torch.Tensor  # [S,D] the token copies, in compute dtype
    token: torch.Tensor  # [S] source token of each row
    gate: torch.Tensor  # [S,1] routing weight of each row
    counts: torch.Tensor  # [E] rows per expert


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors: gate_up_proj [E,2F,D] (gate rows first), down_proj [E,D,F].

    `forward` = dispatch -> grouped compute -> combine; each stage is a method a subclass may replace
    (expert parallelism swaps `dispatch`/`combine` for all-to-all exchanges, a quantized version swaps
    `compute` and `expert_forward`). On disk the experts are per-expert
    `experts.{e}.{gate,up,down}_proj.weight` (see checkpoint.py). `compute` and `expert_forward` read the
    weights through `local_weights()`, the experts [first_expert, first_expert + L) this module computes
    (all of them here; this rank's shard under expert parallelism).
    """

    first_expert = 0  # global index of local_weights()'s first expert
    row_tap: Callable | None = None  # row_tap(dispatch, xs, gu, act, out): see grouped_swiglu

    def __init__(self, config) -> None:
        super().__init__()
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.use_grouped_mm = True  # set False to force the per-expert loop (e.g. to compare)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N,D], indices/weights [N,K] -> sum_k weights[:,k] * expert_{indices[:,k]}(x) [N,D].

        Each expert runs once on the token copies routed to it (no per-token loop, no expert on tokens
        that did not choose it).
        """
        if plain.enabled():
            return self.dense_forward(x, indices, weights)
        d = self.dispatch(x, indices, weights)
        return self.combine(self.compute(d), d, x)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """x's dtype, or the autocast dtype (grouped_mm is not autocast-aware: cast like F.linear)."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> Dispatch:
        """Sort the N*K token copies of x [N,D] by expert (indices/weights [N,K])."""
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # [S] token copies grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        xs = x.to(self.compute_dtype(x)).index_select(0, token)  # [S,D]
        return Dispatch(xs, token, weights.reshape(-1)[order].unsqueeze(-1), counts)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj [L,2F,D], down_proj [L,D,F]) of the experts this module computes, as plain tensors."""
        return self.gate_up_proj, self.down_proj

    def compute(self, d: Dispatch) -> torch.Tensor:
        """Every expert on its block of rows, scaled by the routing weights: [S,D] -> [S,D]."""
        dtype = d.x.dtype
        w_gu, w_down = self.local_weights()
        tap = None if self.row_tap is None else (lambda *rows: self.row_tap(d, *rows))
        return self.grouped_swiglu(d.x, d.gate.to(dtype), d.counts, w_gu.to(dtype), w_down.to(dtype),
                                   self.use_grouped_mm, tap)

    def combine(self, ys: torch.Tensor, d: Dispatch, x: torch.Tensor) -> torch.Tensor:
        """Sum the expert outputs ys [S,D] back per token: -> [N,D] in x's dtype."""
        return torch.zeros_like(x).index_add_(0, d.token, ys.to(x.dtype))

    @staticmethod
    def grouped_linear(xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, use_grouped_mm: bool = True
                       ) -> torch.Tensor:
        """Rows grouped by expert times each expert's matrix: xs [S,I], counts [E], w [E,O,I] -> [S,O]."""
        if use_grouped_mm and grouped_mm_supported(xs, w):
            return torch._grouped_mm(xs, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
        parts = [F.linear(xe, we) for xe, we in zip(xs.split(counts.tolist()), w.unbind(0)) if xe.shape[0]]
        return torch.cat(parts) if parts else xs.new_zeros(0, w.shape[1])  # experts without rows do not run

    @staticmethod
    def grouped_swiglu(xs: torch.Tensor, gate_w: torch.Tensor, counts: torch.Tensor, w_gu: torch.Tensor,
                       w_down: torch.Tensor, use_grouped_mm: bool = True, tap: Callable | None = None
                       ) -> torch.Tensor:
        """Rows grouped by expert -> gate_w * SwiGLU_e(rows): xs [S,D], gate_w [S,1], counts [E] (rows per
        expert, in order), w_gu [E,2F,D], w_down [E,D,F] -> [S,D]. The routing weight is applied on the
        narrower side (before down_proj). Expert parallelism calls this on each rank's local experts.
        `tap(xs, gu_S2F, act_SF, out_SD)` (optional) sees each matrix's input rows and output; per-sample
        gradient code (training/privacy/per_sample.py) hooks the outputs' gradients there."""
        gu = Experts.grouped_linear(xs, counts, w_gu, use_grouped_mm)  # [S,2F]
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate) * up * gate_w
        out = Experts.grouped_linear(act, counts, w_down, use_grouped_mm)  # [S,D]
        if tap is not None:
            tap(xs, gu, act, out)
        return out

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on its rows: x [M,D] -> [M,D] (unweighted; the few-token decoding path)."""
        w_gu, w_down = self.local_weights()
        gate, up = few_rows_linear(x, w_gu[e - self.first_expert]).chunk(2, dim=-1)
        return few_rows_linear(F.silu(gate) * up, w_down[e - self.first_expert])

    def dense_forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Same result as `forward` with plain differentiable ops (see nn/plain.py): every expert on every
        token, x [N,D] -> gate_NE-weighted sum [N,D]; no sort, no data-dependent shapes (vmappable)."""
        gate_NE = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        gate_NE = gate_NE.scatter(1, indices, weights.to(x.dtype))
        gate, up = torch.einsum("nd,efd->nef", x, self.gate_up_proj.to(x.dtype)).chunk(2, dim=-1)  # [N,E,F]
        act_NEF = F.silu(gate) * up * gate_NE.unsqueeze(-1)
        return torch.einsum("nef,edf->nd", act_NEF, self.down_proj.to(x.dtype))


class MoE(nn.Module):
    """Shared experts (always on) + routed experts; x [B,T,D] -> [B,T,D].

    In training it sets `aux_loss` (sequence-wise balance loss and router z-loss, already weighted) and
    accumulates per-expert token counts in `load_counts` for balancing and logging. The loss weights
    (`seq_aux_loss_alpha`, `router_z_loss_coef`) are read from `self.config` at use time, so a resumed
    run that changes them in the config object takes them into account. The router's decision is the
    output of `self.gate` (a forward hook there sees it; this module keeps no copy).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        self.register_buffer("load_counts", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,T,D] -> [B,T,D]; `token_mask` [B,T] (1 = real token) keeps padding out of the statistics."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        routing = self.gate(flat)
        out = self.experts(flat, routing.indices, routing.weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training:
            self._balance_terms(routing, b, t, token_mask)
        return out.view(b, t, d)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding (no gradients): x [B,T,D] -> [B,T,D], the same values as `forward`.

        With few tokens (B*T*K <= E) only the chosen experts run, each once on the rows that chose it
        (`Experts.expert_forward`); the batched dispatch would pay for every expert.
        """
        b, t, d = x.shape
        if b * t * self.top_k > self.num_experts:
            return self.forward(x)
        flat = x.reshape(-1, d)
        routing = self.gate(flat)
        out = self.shared_experts.step(flat) if self.shared_experts is not None else torch.zeros_like(flat)
        rows_of: dict[int, list[tuple[int, float]]] = {}  # expert -> [(token, weight)], first use first
        for i, (ids, ws) in enumerate(zip(routing.indices.tolist(), routing.weights.tolist())):
            for e, w in zip(ids, ws):
                rows_of.setdefault(e, []).append((i, w))
        for e, rows in rows_of.items():
            if len(rows) == 1:
                i, w = rows[0]
                out[i:i + 1] += self.experts.expert_forward(e, flat[i:i + 1]) * w
            else:
                idx = torch.tensor([i for i, _ in rows], device=x.device)
                w = torch.tensor([w for _, w in rows], dtype=out.dtype, device=x.device)[:, None]
                out.index_add_(0, idx, self.experts.expert_forward(e, flat.index_select(0, idx)) * w)
        return out.view(b, t, d)

    def _balance_terms(self, r: Routing, b: int, t: int, token_mask: torch.Tensor | None) -> None:
        """Accumulate loads and compute the (optional) sequence-wise balance loss and router z-loss."""
        e, k = self.num_experts, self.top_k
        alpha, z_coef = self.config.seq_aux_loss_alpha, self.config.router_z_loss_coef
        m = token_mask.reshape(-1).float() if token_mask is not None else None
        with torch.no_grad():
            chosen = torch.zeros_like(r.scores).scatter_(1, r.indices, 1.0)  # [N,E]
            if m is not None:
                chosen = chosen * m[:, None]
            # not an activation-checkpoint recompute in backward; per-sample callers (vmap) count loads themselves
            if torch._C._current_graph_task_id() == -1 and not plain.enabled():
                self.load_counts += chosen.sum(0)
        aux = r.logits.new_zeros(())
        if alpha > 0:
            # L = alpha * sum_i f_i P_i per sequence (DeepSeek-V3 eq. 17-20), averaged over sequences.
            norm_scores = r.scores / (r.scores.sum(-1, keepdim=True) + 1e-20)
            if m is not None:
                norm_scores = norm_scores * m[:, None]
                count = m.view(b, t).sum(1).clamp_min(1)[:, None]
            else:
                count = torch.full((b, 1), float(t), device=r.scores.device)
            p = norm_scores.view(b, t, e).sum(1) / count  # [B,E]
            f = chosen.view(b, t, e).sum(1) * (e / (k * count))  # [B,E]
            aux = aux + alpha * (f * p).sum(-1).mean()
        if z_coef > 0:
            z = torch.logsumexp(r.logits, dim=-1).pow(2)
            z = (z * m).sum() / m.sum().clamp_min(1) if m is not None else z.mean()
            aux = aux + z_coef * z
        self.aux_loss = aux

    @torch.no_grad()
    def update_bias(self, gamma: float) -> dict[str, float]:
        """Auxiliary-loss-free balancing step: b += gamma * sign(mean load - load); resets the counts.

        Returns load statistics of the counts consumed: max/mean load ratio and number of dead experts.
        """
        counts = self.load_counts
        total = float(counts.sum())
        stats = load_stats(counts)
        if gamma > 0 and total > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(counts.mean() - counts)
        counts.zero_()
        return stats


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Load summary of per-expert token counts [E]: fractions, max/mean ratio, dead experts."""
    total = float(counts.sum())
    if total <= 0:
        return {"max_over_mean": 0.0, "dead": float(counts.numel()), "fractions": [0.0] * counts.numel()}
    frac = (counts / total).tolist()
    return {"max_over_mean": float(counts.max() / counts.mean()), "dead": float((counts == 0).sum()),
            "fractions": frac}
