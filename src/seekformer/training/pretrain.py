"""`seekformer pretrain`: one entry point that picks the pretraining loop a recipe asks for."""

from __future__ import annotations

from .recipe import Recipe
from .trainer import Trainer, TrainResult


def pretrain(recipe: Recipe, console=None) -> TrainResult:
    """Pretrain as `recipe` says (on every process of a torchrun launch); with a `privacy:` section, DP-SGD
    on one process (training/privacy/pretrain.py). Returns the TrainResult."""
    if recipe.privacy is not None:
        from .privacy.pretrain import PrivatePretrainer

        trainer: Trainer = PrivatePretrainer(recipe, console=console)
    else:
        trainer = Trainer(recipe, console=console)
    try:
        trainer.prepare()
        return trainer.run()
    finally:
        trainer.par.close()
