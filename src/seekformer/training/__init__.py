"""Training: recipes, the pretraining loop, optimizer and schedule, balancing, checkpoints, logs and plots.

Names are imported lazily, so reading a recipe (`seekformer.training.recipe`) does not import torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {"Recipe": "recipe", "load_recipe": "recipe", "Trainer": "trainer", "TrainResult": "trainer",
            "pretrain": "trainer"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
