"""Fine-tuning with image tasks: the vision tower a recipe asks for and what of it trains (LLaVA stages).

    vision_for_recipe(recipe, tokenizer, lm) -> VisionSetup | None    (None: a text-only fine-tune)
    configure_vision(model, recipe)          -> optimizer param groups of the tower

`vision.stage: 1` trains the projector (and task heads) only, with the trunk and encoder frozen (LLaVA
stage 1: align image tokens with a pretrained LM); `stage: 2` trains everything (the encoder stays frozen
with `vision.freeze`, and its per-image features are then cached).
"""

from __future__ import annotations

from typing import Any

from ..data.tasks import IMAGE_TASK_TYPES
from .multitask_recipe import FinetuneRecipe
from .optim import param_groups


def vision_for_recipe(recipe: FinetuneRecipe, tokenizer, lm):
    """The VisionSetup of a recipe with image tasks (or a vision base model); adds `<|image|>` to the tokenizer."""
    from ..models.vision_lm import is_vision_dir, setup_vision

    if not any(t.type in IMAGE_TASK_TYPES for t in recipe.tasks) and not is_vision_dir(recipe.base):
        return None
    v = recipe.vision
    return setup_vision(recipe.base, tokenizer, lm, v.encoder, v.pretrained, **v.overrides())


def configure_vision(model, recipe: FinetuneRecipe) -> list[dict[str, Any]]:
    """Freeze what the `vision:` section says; return the tower's trainable parameter groups."""
    v, t = recipe.vision, recipe.train
    if v.freeze or v.stage == 1:
        for p in model.vision.encoder.parameters():
            p.requires_grad_(False)
        model.cache_features = True
    if v.stage == 1:
        for p in model.lm.parameters():
            p.requires_grad_(False)
    lr = v.lr if v.lr is not None else t.lr
    return [{**g, "lr": lr} for g in param_groups(model.vision, t.weight_decay) if g["params"]]


__all__ = ["vision_for_recipe", "configure_vision"]
