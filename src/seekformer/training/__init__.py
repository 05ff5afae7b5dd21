"""Training: recipes, the pretraining loop, optimizer and schedule, balancing, logs and plots."""

from .recipe import Recipe, load_recipe
from .trainer import Trainer, TrainResult, pretrain

__all__ = ["Recipe", "load_recipe", "Trainer", "TrainResult", "pretrain"]
