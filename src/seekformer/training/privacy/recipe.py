"""Recipe sections of private training: `privacy:` (DP-SGD) and `federated:` (Flower), both in FinetuneRecipe.

    privacy:                      # DP-SGD (training/privacy/dp_sgd.py)
      epsilon: 8                  # target budget; the noise is calibrated so the planned steps spend it
      delta: 1.0e-5               # must be < 1/n (n = training examples)
      max_grad_norm: 1.0          # per-example clipping bound C
      accountant: rdp             # rdp | prv (Opacus accountants)
      noise_multiplier: null      # give sigma directly instead of calibrating it (epsilon then caps the run)
      balance_share: 0.05         # share of the privacy cost spent on the MoE load counts (full fine-tuning)
      per_sample: auto            # auto | hooks | vmap | loop: how per-example gradients are computed

    federated:                    # federated fine-tuning (training/federated.py)
      clients: 8
      rounds: 10
      fraction_fit: 1.0
      local_steps: 20
      local_batch_size: 16
      strategy: fedavg            # fedavg | fedprox | fedadam
      proximal_mu: 0.01           # fedprox
      partition: dirichlet        # iid | dirichlet | by_label
      alpha: 0.5                  # dirichlet concentration
      expert_sparse: false        # clients send only the routed experts their data used (+ shared weights)
      dp_noise_multiplier: 0.0    # optional client-level DP (DP-FedAvg: clipped updates + Gaussian noise)
      dp_clip_norm: 0.0           # per-client update L2 bound (needed with dp_noise_multiplier > 0)

With a `privacy:` section, `train:` keys the recipe does not set take the DP defaults in `DP_TRAIN_DEFAULTS`
(`DP_ADAPT_DEFAULTS` for method lora / full; a default expected batch above half the examples becomes half of
them), and classification tasks the `DP_TASK_DEFAULTS` (DP-SGD wants
few trainable parameters and large batches; measured in benchmarks/results/privacy.md). `federated:` does the same with `FEDERATED_TRAIN_DEFAULTS` and `FEDERATED_TASK_DEFAULTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import RecipeError

ACCOUNTANTS = ("rdp", "prv")
PER_SAMPLE = ("auto", "hooks", "vmap", "loop")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
PARTITIONS = ("iid", "dirichlet", "by_label")
# train.* values a privacy run uses unless the recipe sets them (see the module docstring).
# The default method is `frozen` with a classification head reading every depth of the trunk plus the text's bag
# of tokens (`features: layers+tokens`, DP_TASK_DEFAULTS): a linear model whose DP noise is small at large batches,
# whose trunk features carry context and whose bag of tokens carries the lexical signal a small trunk loses in
# depth (on the two-class task: 0.69 -> 0.82 at epsilon 8, benchmarks/results/privacy.md). Adapting the trunk
# (`lora`, `full`) under DP gets its own (smaller-batch, lower-lr) values.
DP_TRAIN_DEFAULTS = {"method": "frozen", "batch_size": 512, "lr": 0.005, "head_lr": 0.005, "steps": 400,
                     "warmup_steps": 0, "weight_decay": 0.0}
DP_ADAPT_DEFAULTS = {"batch_size": 64, "lr": 2e-3, "head_lr": 2e-3, "steps": 150}
DP_TASK_DEFAULTS = {"classification": {"pooling": "mean", "features": "layers+tokens", "dropout": 0.0}}
FEDERATED_TRAIN_DEFAULTS = {"lr": 3e-4, "warmup_steps": 0}
# federated classification: the same head features as under DP (two-class task, 8 Dirichlet(0.5) clients, 10 rounds
# of FedAvg: 0.800 with `features: final`, 0.867 with these; benchmarks/results/privacy.md)
FEDERATED_TASK_DEFAULTS = {"classification": {"pooling": "mean", "features": "layers+tokens"}}


@dataclass
class PrivacyRecipe:
    """DP-SGD with an epsilon budget (fine-tuning and pretraining recipes).

    Keys:
        epsilon: target budget; the noise is calibrated so the planned steps spend it
        delta: must be below 1/n for n records (training examples; pretraining: windows)
        max_grad_norm: per-record clipping bound C
        accountant: rdp | prv (Opacus accountants)
        noise_multiplier: give sigma directly instead of calibrating it (epsilon then caps the steps)
        balance_share: share of the privacy cost spent on the MoE load counts (balancing under DP)
        per_sample: auto | hooks | vmap | loop: how per-record gradients are computed (pretraining: loop)
    """

    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    noise_multiplier: float | None = None
    balance_share: float = 0.05
    per_sample: str = "auto"

    def validate(self, n_examples: int | None = None) -> None:
        """Check the section (and delta against the number of training examples when known)."""
        if self.epsilon is None and self.noise_multiplier is None:
            raise RecipeError("privacy: give `epsilon` (a target budget) or `noise_multiplier`")
        if self.epsilon is not None and not self.epsilon > 0:
            raise RecipeError(f"privacy.epsilon must be > 0, got {self.epsilon}")
        if self.delta is None:
            raise RecipeError("privacy.delta is required (e.g. 1e-5; it must be below 1/n for n training examples)")
        if not 0 < self.delta < 1:
            raise RecipeError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if n_examples is not None and self.delta >= 1.0 / n_examples:
            raise RecipeError(f"privacy.delta {self.delta:g} must be below 1/n = {1.0 / n_examples:.3g} for "
                              f"{n_examples} training examples; lower it (e.g. {_suggest_delta(n_examples):g})")
        if not self.max_grad_norm > 0:
            raise RecipeError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise RecipeError(f"unknown privacy.accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise RecipeError(f"privacy.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 <= self.balance_share < 1:
            raise RecipeError(f"privacy.balance_share must be in [0, 1), got {self.balance_share}")
        if self.per_sample not in PER_SAMPLE:
            raise RecipeError(f"unknown privacy.per_sample {self.per_sample!r}; choose one of {', '.join(PER_SAMPLE)}")


@dataclass
class FederatedRecipe:
    """federated fine-tuning (training/federated.py: simulated with Flower, or over gRPC).

    Keys:
        clients: simulated clients (each holds one partition of the training split)
        rounds: federated rounds
        fraction_fit: share of the clients that train in each round
        local_steps: optimizer steps per client per round
        local_batch_size: examples per local step
        strategy: fedavg | fedprox | fedadam
        proximal_mu: FedProx proximal term weight
        server_lr: FedAdam server learning rate
        partition: iid | dirichlet (label skew) | by_label (each client a few labels)
        alpha: Dirichlet concentration (smaller: more skew)
        expert_sparse: clients send only the routed experts their data used (+ the shared weights)
        eval_examples: test examples evaluated after each round (0: all)
        dp_noise_multiplier: client-level DP (DP-FedAvg: clipped updates + Gaussian noise; 0: off)
        dp_clip_norm: per-client update L2 bound (needed with dp_noise_multiplier > 0)
    """

    clients: int = 8
    rounds: int = 10
    fraction_fit: float = 1.0
    local_steps: int = 20
    local_batch_size: int = 16
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # fedadam
    partition: str = "dirichlet"
    alpha: float = 0.5
    expert_sparse: bool = False
    eval_examples: int = 0  # test examples evaluated after each round (0: all)
    dp_noise_multiplier: float = 0.0  # client-level DP (0: off)
    dp_clip_norm: float = 0.0

    def validate(self, n_examples: int | None = None, n_labels: int | None = None) -> None:
        """RecipeError for a bad value (and for more clients than training examples when `n_examples` is known)."""
        for name in ("clients", "rounds", "local_steps", "local_batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"federated.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.fraction_fit <= 1:
            raise RecipeError(f"federated.fraction_fit must be in (0, 1], got {self.fraction_fit}")
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"unknown federated.strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.partition not in PARTITIONS:
            raise RecipeError(f"unknown federated.partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        if not self.alpha > 0:
            raise RecipeError(f"federated.alpha must be > 0, got {self.alpha}")
        if self.proximal_mu < 0 or not self.server_lr > 0:
            raise RecipeError("federated.proximal_mu must be >= 0 and federated.server_lr > 0")
        if self.dp_noise_multiplier < 0 or self.dp_clip_norm < 0:
            raise RecipeError("federated.dp_noise_multiplier and federated.dp_clip_norm must be >= 0")
        if self.dp_noise_multiplier > 0 and not self.dp_clip_norm > 0:
            raise RecipeError("federated.dp_noise_multiplier > 0 needs federated.dp_clip_norm > 0 (the update bound)")
        if n_examples is not None and self.clients > n_examples:
            raise RecipeError(f"federated.clients ({self.clients}) is more than the training examples ({n_examples}); "
                              "lower it")


def _suggest_delta(n: int) -> float:
    """A conventional delta below 1/n: the power of ten at or under 1/(10 n)."""
    import math

    return 10.0 ** math.floor(math.log10(1.0 / (10 * n)))


def private_train_defaults(train: dict | None) -> dict:
    """The `train:` mapping of a recipe with a `privacy:` section, unset keys filled with the DP defaults
    (`DP_ADAPT_DEFAULTS` over `DP_TRAIN_DEFAULTS` when the recipe chooses method lora or full)."""
    user = dict(train or {})
    base = DP_TRAIN_DEFAULTS
    if user.get("method", base["method"]) != "frozen":
        base = {**base, **DP_ADAPT_DEFAULTS}
    return {**base, **user}


__all__ = ["PrivacyRecipe", "FederatedRecipe", "DP_TRAIN_DEFAULTS", "FEDERATED_TRAIN_DEFAULTS", "FEDERATED_TASK_DEFAULTS",
           "private_train_defaults", "DP_TASK_DEFAULTS", "DP_ADAPT_DEFAULTS",
           "ACCOUNTANTS", "STRATEGIES", "PARTITIONS", "PER_SAMPLE"]
