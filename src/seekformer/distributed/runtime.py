"""One training run's view of its processes: process group, model wrapping, collectives, sharded checkpoints.

`Parallel.from_env(recipe.parallel, device)` reads what torchrun (or `seekformer pretrain --nproc N`) put in
the environment. With one process every method is the identity or a no-op, so the trainers have a single
code path. With several:

  * data: `train.batch_size` is the GLOBAL batch; rank r trains on rows [r*b, (r+1)*b) of every step's
    batch (b = batch_size / world), so the same sequences make up each step on 1 or N processes and the
    loss curve does not depend on the world size;
  * `wrap(model)`: expert parallelism first (routed experts sharded over `expert_parallel` ranks), then
    DDP or FSDP2 (`fully_shard` per decoder block, then the root) over all ranks for the other weights;
  * gradients: DDP/FSDP average them over ranks; `finish_gradients` does the same for the expert shards;
    `clip_grad_norm_` computes the global norm over replicated, FSDP-sharded and expert-sharded gradients;
  * balancing: `reduce_loads` sums the MoE layers' expert-load counts over ranks before the aux-loss-free
    bias update, so every rank applies the same update as a 1-process run;
  * checkpoints: `save_state` / `load_state` use torch.distributed.checkpoint (DCP) with FQN-keyed model and
    optimizer state dicts: a checkpoint written by any number of processes loads on any other (DCP
    reshards), and `full_model_state` gathers plain tensors on rank 0 to write the Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .config import ParallelRecipe


def _backend(p: ParallelRecipe, device: torch.device) -> str:
    if p.backend != "auto":
        return p.backend
    return "nccl" if device.type == "cuda" else "gloo"


class Parallel:
    """Process-group state of one run (see the module docstring); `Parallel.single()` for one process."""

    def __init__(self, recipe: ParallelRecipe, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None) -> None:
        self.recipe = recipe
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.mesh = None  # DeviceMesh when expert parallelism or FSDP needs one
        self.expert_params: list[nn.Parameter] = []
        self.wrapped: nn.Module | None = None
        self._owns_group = False

    # ------------------------------------------------------------------ set-up
    @classmethod
    def single(cls, recipe: ParallelRecipe | None = None, device: str | torch.device = "cpu") -> Parallel:
        return cls(recipe or ParallelRecipe(), device=torch.device(device))

    @classmethod
    def from_env(cls, recipe: ParallelRecipe, device: str | torch.device = "cpu") -> Parallel:
        """Join the process group that torchrun's environment describes (a 1-process Parallel without one)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = torch.device(device)
        if world <= 1:
            return cls.single(recipe, device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self = cls(recipe, rank, world, local_rank, device)
        if not dist.is_initialized():
            dist.init_process_group(_backend(recipe, device))
            self._owns_group = True
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over ranks (one collective for all of them)."""
        if not self.distributed:
            return list(values)
        return [v / self.world_size for v in self.sum(values)]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over ranks (one collective for all of them, in float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads_(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of replicated `params` over ranks in place, through one flat buffer.

        A parameter without a gradient on every rank keeps none (so AdamW skips it, as on one process); one
        with a gradient on some ranks only gets the others' sum (a missing gradient counts as zeros).
        """
        if not self.distributed or not params:
            return
        has = torch.tensor([q.grad is not None for q in params], dtype=torch.int32)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [q for q, h in zip(params, has.tolist()) if h]
        if not live:
            return
        flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in live])
        dist.all_reduce(flat)
        offset = 0
        for q in live:
            q.grad = flat[offset: offset + q.numel()].view_as(q).clone()
            offset += q.numel()

    def broadcast_module_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's `module` (as DDP does when it wraps)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_then_others(self) -> contextlib.AbstractContextManager:
        """Run the block on rank 0 first, then on the others (e.g. building a cache the others reuse)."""
        return _first_then_others(self)

    # ------------------------------------------------------------------ data
    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` rows: [r*b, (r+1)*b) with b = batch_size / world
        (rounded up when it does not divide, so the last ranks may get fewer rows, or none)."""
        b = -(-batch_size // self.world_size)
        return slice(min(self.rank * b, batch_size), min((self.rank + 1) * b, batch_size))

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply expert parallelism and DDP/FSDP2 to `model` (in place where possible); returns the module
        to call for forward passes (`model` itself with one process)."""
        if self.recipe.activation_checkpointing:
            checkpoint_blocks(model)
        if not self.distributed:
            self.wrapped = model
            return model
        from torch.distributed.device_mesh import init_device_mesh

        p = self.recipe
        dev = self.device.type
        ep = p.expert_parallel
        if ep > 1:
            from .expert_parallel import apply_expert_parallel

            shape, names = ((self.world_size // ep, ep), ("dp_rep", "ep")) if ep < self.world_size else \
                ((ep,), ("ep",))
            self.mesh = init_device_mesh(dev, shape, mesh_dim_names=names)
            self.expert_params = apply_expert_parallel(model, self.mesh)
        ignored = set(self.expert_params)
        if p.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            dp_mesh = init_device_mesh(dev, (self.world_size,), mesh_dim_names=("dp",))
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if p.mixed_precision == "bf16" else MixedPrecisionPolicy()
            blocks = list(model.model.layers) + [m.block for m in getattr(model, "mtp", [])]
            for block in blocks:
                fully_shard(block, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored or None)
            fully_shard(model, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored or None)
            self.wrapped = model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.expert_params:
                names = [n for n, q in model.named_parameters() if any(q is e for e in self.expert_params)]
                DDP._set_params_and_buffers_to_ignore_for_model(model, names)
            ids = [self.device.index] if dev == "cuda" else None
            self.wrapped = DDP(model, device_ids=ids, broadcast_buffers=False)
        return self.wrapped

    @property
    def optimizer_impl(self) -> str:
        """The AdamW implementation the wrapped parameters allow (after `wrap`): fused for plain tensors,
        foreach when every parameter is a DTensor (FSDP2), the per-tensor loop when both kinds mix."""
        if not self.distributed:
            return "fused"
        return "foreach" if self.recipe.strategy == "fsdp" else ("for" if self.expert_params else "fused")

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Gradient accumulation: skip the gradient all-reduce/reduce-scatter unless `last`."""
        m = self.wrapped
        if not self.distributed or last or m is None:
            yield
            return
        if hasattr(m, "no_sync"):  # DDP
            with m.no_sync():
                yield
        elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                m.set_requires_gradient_sync(True)
        else:
            yield

    def finish_gradients(self) -> None:
        """Average the expert-shard gradients over ranks (DDP/FSDP averaged everything else)."""
        if self.expert_params:
            from .expert_parallel import sync_expert_grads

            sync_expert_grads(self.expert_params, self.mesh, self.world_size)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Clip all gradients to a global L2 norm of `max_norm` (inf: measure only); returns the norm."""
        params = [q for q in model.parameters() if q.grad is not None]
        if not self.distributed:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor, Replicate

        plain = torch.zeros((), dtype=torch.float64)
        sharded = torch.zeros((), dtype=torch.float64)
        for q in params:
            g = q.grad
            if isinstance(g, DTensor):
                copies = 1  # a shard replicated over some mesh dims is summed that many times below
                for placement, size in zip(g.placements, g.device_mesh.shape):
                    if isinstance(placement, Replicate):
                        copies *= size
                sharded += g.to_local().double().square().sum().cpu() / copies
            else:
                plain += g.double().square().sum().cpu()
        dist.all_reduce(sharded)
        total = float((plain + sharded).sqrt())
        if max_norm != float("inf") and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for q in params:
                (q.grad.to_local() if isinstance(q.grad, DTensor) else q.grad).mul_(coef)
        return total

    def reduce_loads(self, moe_layers) -> None:
        """Sum every MoE layer's expert-load counts over ranks (before the aux-loss-free bias update)."""
        if not self.distributed:
            return
        counts = [m.load_counts for _, m in moe_layers]
        if counts:
            flat = torch.cat(counts)
            dist.all_reduce(flat)
            for c, new in zip(counts, flat.split([c.numel() for c in counts])):
                c.copy_(new)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, directory: str | os.PathLike, model: nn.Module, optimizer) -> None:
        """Model + optimizer state through DCP into `directory` (every rank writes its shards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory), no_dist=not self.distributed)

    def load_state(self, directory: str | os.PathLike, model: nn.Module, optimizer) -> None:
        """Load what `save_state` wrote, whatever number of processes wrote it (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(directory), no_dist=not self.distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Plain full tensors of every weight on rank 0 (None on the others); `model.state_dict()` alone."""
        if not self.distributed:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.expert_params:  # DTensors on the expert mesh: gather them (the helper skips non-FSDP DTensors)
            from torch.distributed.tensor import DTensor

            sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in sd.items()}
            sd = {k: v.cpu() for k, v in sd.items()}
        return sd if self.is_main else None


@contextlib.contextmanager
def _first_then_others(p: Parallel) -> Iterator[None]:
    if not p.distributed:
        yield
        return
    if not p.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if p.is_main:
            dist.barrier()


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every decoder block's activations in backward (non-reentrant torch.utils.checkpoint).

    The block's `forward` is wrapped in place, so parameter names (and checkpoints) do not change; MoE layers
    skip their load counting while being recomputed (nn.moe), so balancing sees every token once.
    """
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.model.layers) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
