"""Private training: DP-SGD with an epsilon budget (dp_sgd.py), its accountant (accounting.py), per-example
gradients (per_sample.py), the recipe sections (recipe.py) and the canary audit (canaries.py).
Federated fine-tuning lives in training/federated.py. Heavy imports (opacus, flwr) happen on use."""

from .recipe import DP_ADAPT_DEFAULTS, DP_TASK_DEFAULTS, DP_TRAIN_DEFAULTS, FederatedRecipe, PrivacyRecipe

__all__ = ["PrivacyRecipe", "FederatedRecipe", "DP_TRAIN_DEFAULTS", "DP_ADAPT_DEFAULTS", "DP_TASK_DEFAULTS"]
