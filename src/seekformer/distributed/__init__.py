"""Distributed training below `training/`: process groups, DDP / FSDP2 wrapping, expert parallelism
(all-to-all dispatch of routed experts), sharded checkpoints (torch.distributed.checkpoint) and the launcher.

    torchrun --nproc_per_node 2 -m seekformer pretrain RECIPE      # or: seekformer pretrain RECIPE --nproc 2
"""

from .config import ParallelRecipe, check_parallel, env_world_size
from .runtime import Parallel

__all__ = ["Parallel", "ParallelRecipe", "check_parallel", "env_world_size"]
