"""`seekformer finetune`: one entry point that picks the training loop a recipe asks for."""

from __future__ import annotations

from .multitask import FinetuneResult, MultiTaskTrainer
from .multitask_recipe import FinetuneRecipe


def finetune(recipe: FinetuneRecipe, console=None) -> FinetuneResult:
    """Fine-tune as `recipe` says: federated (training/federated.py) with a `federated:` section, DP-SGD
    (training/privacy/dp_sgd.py) with a `privacy:` section, else the multi-task trainer."""
    if recipe.federated is not None:
        from .federated import federated_finetune

        return federated_finetune(recipe, console=console)
    trainer_cls = MultiTaskTrainer
    if recipe.privacy is not None:
        from .privacy.dp_sgd import PrivateTrainer

        trainer_cls = PrivateTrainer
    trainer = trainer_cls(recipe, console=console)
    try:
        trainer.prepare()
        return trainer.run()
    finally:
        trainer.par.close()  # the process group of a torchrun / --nproc launch
