"""Expert parallelism: the routed experts of every MoE layer sharded over E ranks, tokens moved by all-to-all.

Shapes: N local tokens, K experts per token, S = N*K token copies, D hidden, F expert width,
E routed experts, L = E / ep local experts per rank, R rows this rank's experts receive.

Rank r of the expert-parallel group holds experts [r*L, (r+1)*L) as DTensor parameters sharded on dim 0
(`Shard(0)` over the "ep" mesh dimension, `Replicate()` over "dp_rep" when the world is larger than the
group), so torch.distributed.checkpoint can reshard them to any other layout on load. The forward of one
MoE layer (as torchtitan's expert parallel, without its padding):

    1. dispatch: sort the S token copies by expert (the same order as local dispatch), exchange the
       per-expert counts (all_to_all of E numbers), then the rows themselves with the gate weight as one
       extra column (all_to_all_single with uneven splits, autograd-aware);
    2. compute: regroup the received rows by local expert (stable: source rank, then token order) and run
       the grouped SwiGLU of `nn.moe.Experts` on the local weights;
    3. combine: send the results back (the inverse all_to_all) and sum them per token with index_add.

Gradients reach the expert shards through the all-to-all backward: rank r's experts get the sum over the
group's ranks of d(local loss)/d(weights). `sync_expert_grads` then sums over the "dp_rep" replicas and
divides by the world size, matching the averaging DDP/FSDP apply to every other parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd  # (torch's recommended form)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..nn.moe import Experts, MoE


class ExpertParallelExperts(nn.Module):
    """Drop-in for `nn.moe.Experts` holding this rank's L experts; forward(x_ND, indices_NK, weights_NK)."""

    def __init__(self, experts: Experts, mesh: DeviceMesh) -> None:
        super().__init__()
        ep_mesh = mesh["ep"] if mesh.ndim > 1 else mesh
        self.group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        self.num_experts = experts.num_experts
        self.num_local = self.num_experts // self.ep_size
        placements = [Replicate(), Shard(0)] if mesh.ndim > 1 else [Shard(0)]
        lo, hi = self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local

        def shard(p: torch.Tensor) -> nn.Parameter:
            local = p.detach()[lo:hi].clone()
            return nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False))

        self.gate_up_proj = shard(experts.gate_up_proj)
        self.down_proj = shard(experts.down_proj)
        self.use_grouped_mm = experts.use_grouped_mm
        # all-to-all traffic counters (telemetry, never saved): tokens dispatched, bytes sent, bytes that left
        # this rank (rows whose expert lives elsewhere), in both directions
        self.traffic = {"tokens": 0, "bytes": 0, "remote_bytes": 0}

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N,D], indices/weights [N,K] -> sum_k weights[:,k] * expert_{indices[:,k]}(x) [N,D]."""
        ep, local = self.ep_size, self.num_local
        n, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # [S] copies grouped by expert, hence by destination rank
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E] rows for each expert
        gate_w = weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)  # [S,1]
        send = torch.cat([x.index_select(0, token), gate_w], dim=-1)  # [S,D+1]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # chunk s: source s's rows per local expert
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = recv_counts.view(ep, local).sum(1).tolist()
        recv = _all_to_all(send, recv_splits, send_splits, self.group)  # [R,D+1] by (source, expert)
        expert_of_row = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv_counts)
        perm = expert_of_row.argsort(stable=True)  # regroup by local expert
        rows = recv.index_select(0, perm)
        local_counts = recv_counts.view(ep, local).sum(0)
        y = self._compute(rows[:, :-1].contiguous(), rows[:, -1:].contiguous(), local_counts)  # [R,D]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        back = _all_to_all(y.index_select(0, inverse), send_splits, recv_splits, self.group)  # [S,D]
        self._count(n, send, y, send_splits)
        return torch.zeros_like(x).index_add_(0, token, back.to(x.dtype))

    def _count(self, n: int, send: torch.Tensor, y: torch.Tensor, send_splits: list[int]) -> None:
        """Add the all-to-all traffic this rank's n tokens cause: their S = n*K rows out (D+1 wide) and their
        results back (D wide); `remote_bytes` counts only rows whose expert lives on another rank."""
        row = send.shape[1] * send.element_size() + y.shape[1] * y.element_size()
        self.traffic["tokens"] += n
        self.traffic["bytes"] += sum(send_splits) * row
        self.traffic["remote_bytes"] += (sum(send_splits) - send_splits[self.ep_rank]) * row

    def _compute(self, xs: torch.Tensor, gate_w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The grouped SwiGLU of the local experts on rows grouped by expert: xs [R,D], gate_w [R,1] -> [R,D]."""
        w_gu, w_down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        return Experts.grouped_swiglu(xs, gate_w, counts, w_gu, w_down, self.use_grouped_mm)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of x [sum(in_splits), C] exchanged with every rank of `group` -> [sum(out_splits), C] (autograd:
    the backward is the reverse exchange)."""
    out = all_to_all_single_autograd(x, out_splits, in_splits, group)
    return out.wait() if hasattr(out, "wait") else out


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace the `experts` of every MoE layer (main and MTP) by its expert-parallel shard, in place.

    Every rank must hold the same full weights before the call (same seed or same checkpoint). Returns the
    new expert parameters (DDP/FSDP leave them alone; `sync_expert_grads` averages their gradients).
    """
    params = []
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts = ExpertParallelExperts(m.experts, mesh)
            params += [m.experts.gate_up_proj, m.experts.down_proj]
    return params


def sync_expert_grads(params: list[nn.Parameter], mesh: DeviceMesh, world_size: int) -> None:
    """Sum expert gradients over the data-parallel replicas of each shard, then divide by the world size."""
    rep_group = mesh["dp_rep"].get_group() if mesh.ndim > 1 else None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if rep_group is not None:
            dist.all_reduce(g, group=rep_group)
        g.div_(world_size)
