"""Training: recipes, the pretraining loop, optimizer and schedule, balancing, checkpoints, logs and plots.

Names are imported lazily, so reading a recipe (`seekformer.training.recipe`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Recipe": "recipe", "load_recipe": "recipe", "Trainer": "trainer", "TrainResult": "trainer",
            "pretrain": "trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
