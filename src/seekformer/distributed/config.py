"""The recipe's `parallel:` section and its checks, made before any process group exists.

    parallel:
      strategy: ddp            # ddp | fsdp (FSDP2 `fully_shard`)
      expert_parallel: 1       # E: routed experts sharded over E ranks, tokens exchanged by all-to-all
      backend: auto            # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
      mixed_precision: none    # none | bf16 (FSDP2 MixedPrecisionPolicy; GPU)
      activation_checkpointing: false

Every check here reads only the recipe, the model config and the launcher's environment (WORLD_SIZE), so
every rank reaches the same verdict before the first collective: a bad recipe makes every rank exit 2 with
the same one-line message (printed by rank 0) instead of hanging in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import RecipeError

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
MIXED_PRECISION = ("none", "bf16")


@dataclass
class ParallelRecipe:
    """How a run uses several processes (ignored by a 1-process run, except `expert_parallel` must be 1)."""

    strategy: str = "ddp"  # ddp | fsdp
    expert_parallel: int = 1  # ranks the routed experts are sharded over (divides the world size and E)
    backend: str = "auto"  # auto | gloo | nccl
    mixed_precision: str = "none"  # none | bf16: FSDP2 parameters in bf16, gradients reduced in fp32
    activation_checkpointing: bool = False  # recompute each decoder block in backward (saves activations)


def env_world_size() -> int:
    """The world size the launcher (torchrun / `--nproc`) set, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_parallel(p: ParallelRecipe, world_size: int, batch_size: int, n_routed_experts: int,
                   grad_accum: int = 1) -> None:
    """Raise RecipeError for settings that cannot run on `world_size` processes."""
    if p.strategy not in STRATEGIES:
        raise RecipeError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got {p.strategy!r}")
    if p.backend not in BACKENDS:
        raise RecipeError(f"parallel.backend must be one of {', '.join(BACKENDS)}, got {p.backend!r}")
    if p.mixed_precision not in MIXED_PRECISION:
        raise RecipeError(f"parallel.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                          f"got {p.mixed_precision!r}")
    ep = p.expert_parallel
    if not isinstance(ep, int) or ep < 1:
        raise RecipeError(f"parallel.expert_parallel must be an integer >= 1, got {ep!r}")
    if ep > 1:
        if n_routed_experts == 0:
            raise RecipeError("parallel.expert_parallel > 1 needs a MoE model (n_routed_experts > 0)")
        if world_size % ep:
            raise RecipeError(f"parallel.expert_parallel={ep} must divide the number of processes ({world_size})")
        if n_routed_experts % ep:
            raise RecipeError(f"parallel.expert_parallel={ep} must divide model.n_routed_experts "
                              f"({n_routed_experts})")
    if batch_size % world_size:
        raise RecipeError(f"train.batch_size={batch_size} does not split over {world_size} processes: use a "
                          f"multiple of {world_size} (it is the global batch; each rank takes its slice)")
