"""Distributed training below `training/`: process groups, DDP / FSDP2 wrapping, expert parallelism
(all-to-all dispatch of routed experts), sharded checkpoints (torch.distributed.checkpoint) and the launcher.

    torchrun --nproc_per_node 2 -m seekformer pretrain RECIPE      # or: seekformer pretrain RECIPE --nproc 2

Names are imported lazily: reading a recipe (its `parallel:` section, `distributed.config`) does not import
torch, so the CLI starts (and sets its OpenMP defaults) before torch loads.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {"Parallel": "runtime", "ParallelRecipe": "config", "check_parallel": "config",
            "env_world_size": "config"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
