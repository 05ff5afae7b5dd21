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

`ExpertParallelExperts` is an `nn.moe.Experts` that replaces `dispatch` (1.) and `combine` (3.) only; the
grouped compute (2.) and `expert_forward` are the base class's, on `local_weights()`.

Gradients reach the expert shards through the all-to-all backward: rank r's experts get the sum over the
group's ranks of d(local loss)/d(weights). `sync_expert_grads` then sums over the "dp_rep" replicas and
divides by the world size, matching the averaging DDP/FSDP apply to every other parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd  # (torch's recommended form)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..nn.moe import Dispatch, Experts, MoE


@dataclass
class ExchangedDispatch(Dispatch):
    """What this rank's experts received (x [R,D], gate [R,1], counts [L] rows per local expert, grouped by
    local expert), plus how to send the results back: `source` is the local dispatch of this rank's own
    tokens, `inverse` puts the results back in arrival order, the splits are rows per peer rank."""

    source: Dispatch | None = None
    inverse: torch.Tensor | None = None
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)


class ExpertParallelExperts(Experts):
    """`nn.moe.Experts` holding this rank's L experts: `dispatch` and `combine` become all-to-all exchanges,
    the grouped compute and `expert_forward` (for this rank's experts) are the base class's."""

    def __init__(self, experts: Experts, mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: that would allocate all E experts
        ep_mesh = mesh["ep"] if mesh.ndim > 1 else mesh
        self.group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        self.num_experts = experts.num_experts
        self.num_local = self.num_experts // self.ep_size
        self.first_expert = self.ep_rank * self.num_local
        placements = [Replicate(), Shard(0)] if mesh.ndim > 1 else [Shard(0)]
        lo, hi = self.first_expert, self.first_expert + self.num_local

        def shard(p: torch.Tensor) -> nn.Parameter:
            local = p.detach()[lo:hi].clone()
            return nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False))

        self.gate_up_proj = shard(experts.gate_up_proj)
        self.down_proj = shard(experts.down_proj)
        self.use_grouped_mm = experts.use_grouped_mm
        # all-to-all traffic counters (telemetry, never saved): tokens dispatched, bytes sent, bytes that left
        # this rank (rows whose expert lives elsewhere), in both directions
        self.traffic = {"tokens": 0, "bytes": 0, "remote_bytes": 0}

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts [first_expert, first_expert + L) as plain (local) tensors."""
        return self.gate_up_proj.to_local(), self.down_proj.to_local()

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> ExchangedDispatch:
        """Sort this rank's N*K token copies by expert (as local dispatch does), then exchange them: every
        rank receives the rows of its experts from every rank (the gate weight rides as one extra column)."""
        ep, local = self.ep_size, self.num_local
        own = super().dispatch(x, indices, weights)  # [S,D] by expert, hence by destination rank
        send = torch.cat([own.x, own.gate.to(own.x.dtype)], dim=-1)  # [S,D+1]
        recv_counts = torch.empty_like(own.counts)
        dist.all_to_all_single(recv_counts, own.counts, group=self.group)  # chunk s: source s's rows per expert
        send_splits = own.counts.view(ep, local).sum(1).tolist()
        recv_splits = recv_counts.view(ep, local).sum(1).tolist()
        recv = _all_to_all(send, recv_splits, send_splits, self.group)  # [R,D+1] by (source, expert)
        expert_of_row = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv_counts)
        perm = expert_of_row.argsort(stable=True)  # regroup by local expert (stable: source rank, then token)
        rows = recv.index_select(0, perm)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return ExchangedDispatch(rows[:, :-1].contiguous(), own.token, rows[:, -1:].contiguous(),
                                 recv_counts.view(ep, local).sum(0), source=own, inverse=inverse,
                                 send_splits=send_splits, recv_splits=recv_splits)

    def combine(self, ys: torch.Tensor, d: ExchangedDispatch, x: torch.Tensor) -> torch.Tensor:
        """Send the results ys [R,D] back to the ranks their tokens came from, then sum them per token."""
        back = _all_to_all(ys.index_select(0, d.inverse), d.send_splits, d.recv_splits, self.group)  # [S,D]
        self._count(x.shape[0], d.source.x.shape[1] + 1, d.source.x.element_size(), ys, d.send_splits)
        return super().combine(back, d.source, x)

    def _count(self, n: int, width: int, item: int, y: torch.Tensor, send_splits: list[int]) -> None:
        """Add the all-to-all traffic this rank's n tokens cause: their S = n*K rows out (`width` = D+1 values
        of `item` bytes) and their results back (D wide); `remote_bytes` counts only rows whose expert lives
        on another rank."""
        row = width * item + y.shape[1] * y.element_size()
        self.traffic["tokens"] += n
        self.traffic["bytes"] += sum(send_splits) * row
        self.traffic["remote_bytes"] += (sum(send_splits) - send_splits[self.ep_rank]) * row


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
