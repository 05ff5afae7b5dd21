"""Fine-tuning recipes: YAML that maps 1:1 onto `FinetuneRecipe`, with `--section.key value` overrides.

    base: seekformer-quickstart         # a pretrained model directory (its tokenizer is used too)
    out: runs/finetune                  # where the fine-tuned model, logs and results go
    tasks:                              # one entry per task: see seekformer.data.tasks.TaskRecipe
      - {name: topic, type: classification, train: train.jsonl, validation: val.jsonl}
    train:    {steps: 300, batch_size: 16, lr: 3e-4, method: full | lora | frozen, sampling: all, ...}
    weighting: {strategy: fixed | uncertainty | gradnorm | dwa, pcgrad: false, ...}
    lora:     {r: 8, alpha: 16, dropout: 0.0, targets: [q_proj, kv_b_proj, o_proj, ...]}
    parallel: {strategy: ddp, backend: auto}   # several processes: `seekformer finetune RECIPE --nproc 2`

A task whose `train` is `builtin:NAME` takes its type, labels and validation/test splits from the builtin
set unless the recipe says otherwise. Overrides: `--train.steps 50`, `--weighting.strategy dwa`,
`--base DIR`, `--out DIR`, `--tasks.NAME.max_train_examples 500`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..data.tasks import TaskRecipe, builtin_defaults
from ..distributed.config import ParallelRecipe, check_parallel, env_world_size
from ..errors import RecipeError, SeekformerError, TaskError
from ..models.multitask import DEFAULT_LORA_TARGETS
from .privacy.recipe import (DP_TASK_DEFAULTS, FEDERATED_TASK_DEFAULTS, FEDERATED_TRAIN_DEFAULTS, FederatedRecipe,
                             PrivacyRecipe, private_train_defaults)
from .recipe import build_section, apply_overrides, read_recipe_dict
from .weighting import STRATEGIES

METHODS = ("full", "lora", "frozen")
SAMPLING = ("all", "proportional", "temperature", "uniform")


@dataclass
class FinetuneTrainRecipe:
    """`train:` the fine-tuning loop.

    Keys:
        steps: optimizer steps in all (may change on resume)
        batch_size: examples per task per step
        lr: learning rate of the trunk (or of the LoRA adapters)
        head_lr: learning rate of the task heads (null: 10 x lr)
        warmup_steps: linear warm-up steps
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio
        weight_decay: AdamW weight decay
        grad_clip: clip the gradient norm to this (0: no clipping)
        method: full (train everything) | lora (trunk frozen, adapters trained) | frozen (heads only)
        init: pretrained | scratch (the base's architecture and tokenizer, random weights)
        sampling: all (every task every step) | proportional | temperature | uniform (tasks_per_step drawn)
        temperature: sampling temperature: task i is drawn with p_i ~ n_i^(1/T)
        tasks_per_step: with a sampling mode: how many distinct tasks one step trains
        seed: one seed for data order, initialisation and sampling
        device: cpu, cuda, cuda:N or mps
        threads: CPU threads for torch (null: torch's choice)
        eval_every: evaluate on the validation splits every N steps (0: only at the end)
        eval_examples: validation examples per task at the periodic evaluations
        eval_batch_size: examples per forward pass when evaluating
        validate: evaluate on the validation splits at the end
        test: evaluate on the test splits at the end
        log_every: write a metrics record every N steps
        progress: show a progress bar
        save_every: write OUT/checkpoints/step-N (full training state) every N steps (0: only on Ctrl-C)
        keep_checkpoints: how many of this run's newest checkpoints to keep
        resume: continue from the newest checkpoint in OUT/checkpoints, exactly (same recipe required)
        overwrite: start afresh in an OUT that holds an earlier run's checkpoints (they are deleted)
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-4
    head_lr: float | None = None
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    method: str = "full"
    init: str = "pretrained"
    sampling: str = "all"
    temperature: float = 2.0
    tasks_per_step: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    eval_every: int = 0
    eval_examples: int = 200
    eval_batch_size: int = 32
    validate: bool = True
    test: bool = True
    log_every: int = 10
    progress: bool = True
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False


@dataclass
class WeightingRecipe:
    """`weighting:` how the task losses are weighted.

    Keys:
        strategy: fixed (each task's `weight`) | uncertainty (Kendall et al.) | gradnorm | dwa (dynamic weight average)
        pcgrad: project conflicting task gradients on the shared trunk (PCGrad, Yu et al. 2020)
        alpha: GradNorm asymmetry
        lr: learning rate of learned weights (uncertainty, gradnorm)
        temperature: DWA softmax temperature
        window: DWA: steps per loss-averaging window
    """

    strategy: str = "fixed"
    pcgrad: bool = False
    alpha: float = 1.5
    lr: float = 0.025
    temperature: float = 2.0
    window: int = 20


@dataclass
class LoraRecipe:
    """`lora:` low-rank adapters (with train.method lora).

    Keys:
        r: adapter rank
        alpha: scaling: the update is (alpha / r) * B A
        dropout: dropout on the adapter input (0 where experts are adapted)
        targets: module names that get adapters (attention and expert projections)
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class VisionRecipe:
    """the image encoder of a fine-tune with image tasks (models/vision_lm.py).

    A base model that already has vision files keeps its own tower; these keys then do not apply.

    Keys:
        encoder: the encoder preset: vit-nano | vit-tiny | vit-small | vit-base (nn/vision.py)
        image_size: pixels per side (default 32)
        patch_size: pixels per patch side (default: the preset's)
        channels: 1 (grey) or 3 (RGB, default)
        pixel_shuffle: merge 2x2 patches into one image token (fewer image tokens)
        conv_stem: put the preset's 3x3 conv stem before the patch embedding (default: the preset's)
        strided_stem: patchify with stride-2 3x3 convs instead of one P x P conv (default: the preset's)
        text_first: prompts put the question before the image (default true; the image tokens then see it)
        token_positions: add a learned embedding per image-token slot after the projector (default false)
        global_token: one more image token, an MLP of the whole flattened feature map (default false)
        pretrained: a model directory with a trained vision tower to start from
        freeze: keep the encoder's weights fixed (its features are cached per image)
        stage: 1 trains only the projector and task heads (LLaVA stage 1); 2 everything trainable
        lr: encoder and projector learning rate (default train.lr)
    """

    encoder: str = "vit-tiny"  # preset: vit-nano | vit-tiny | vit-small | vit-base (nn/vision.py)
    image_size: int | None = None  # pixels per side (default 32)
    patch_size: int | None = None  # default: the preset's
    channels: int | None = None  # 1 (grey) or 3 (RGB, default)
    pixel_shuffle: bool | None = None  # merge 2x2 patches into one image token
    conv_stem: bool | None = None  # 3x3 conv stem before the patch embedding (default: the preset's)
    strided_stem: bool | None = None  # stride-2 3x3 convs instead of the P x P patch conv (default: the preset's)
    text_first: bool | None = None  # the question before the image in prompts (default true)
    token_positions: bool | None = None  # a learned embedding per image-token slot after the projector
    global_token: bool | None = None  # one more image token: an MLP of the whole flattened feature map
    pretrained: str | None = None  # a model directory with a trained vision tower to start from
    freeze: bool = False  # keep the encoder's weights fixed (its features are cached per image)
    stage: int = 2  # 1: train only the projector (and task heads; LLaVA stage 1); 2: everything trainable
    lr: float | None = None  # encoder and projector learning rate (default train.lr)

    def overrides(self) -> dict[str, Any]:
        """The VisionConfig fields this section sets on top of the encoder preset."""
        return {"image_size": self.image_size if self.image_size is not None else 32, "patch_size": self.patch_size,
                "channels": self.channels, "pixel_shuffle": self.pixel_shuffle, "conv_stem": self.conv_stem,
                "strided_stem": self.strided_stem, "text_first": self.text_first,
                "token_positions": self.token_positions, "global_token": self.global_token}

    def validate(self) -> None:
        """RecipeError for an unknown stage or a non-positive learning rate."""
        if self.stage not in (1, 2):
            raise RecipeError(f"vision.stage must be 1 (projector only) or 2 (everything), got {self.stage}")
        if self.lr is not None and not self.lr > 0:
            raise RecipeError(f"vision.lr must be > 0, got {self.lr}")


@dataclass
class FinetuneRecipe:
    """A fine-tuning recipe (docs/recipes.md lists every key).

    Keys:
        base: the pretrained model directory (its tokenizer is used too)
        out: where the fine-tuned model, its heads, logs, checkpoints and results go
        tasks: the tasks: a list of task mappings (see `tasks[]` below)
        train: the training loop (section below)
        weighting: loss weighting (section below)
        lora: LoRA adapters (section below)
        vision: the image encoder for image tasks (section below)
        privacy: DP-SGD: an epsilon budget or a noise multiplier (section below; null: not private)
        federated: federated fine-tuning over simulated or real clients (section below; null: central)
        parallel: several processes (torchrun / --nproc): strategy ddp only (replicated weights, gradients
            summed over ranks); keys as in the pretraining `parallel:` section above
    """

    base: str = ""
    out: str = "runs/finetune"
    tasks: list[TaskRecipe] = field(default_factory=list)
    train: FinetuneTrainRecipe = field(default_factory=FinetuneTrainRecipe)
    weighting: WeightingRecipe = field(default_factory=WeightingRecipe)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    vision: VisionRecipe = field(default_factory=VisionRecipe)
    privacy: PrivacyRecipe | None = None  # DP-SGD (training/privacy/); None: not private
    federated: FederatedRecipe | None = None  # federated fine-tuning (training/federated.py)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)  # several processes (strategy ddp)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain dicts and lists (what recipe.yaml holds)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self) -> None:
        """Raise RecipeError/TaskError for missing base or tasks, repeated names, out-of-range values, unknown choices
        and combinations that cannot train."""
        t, w = self.train, self.weighting
        if not self.base:
            raise RecipeError("the recipe needs `base:` (a pretrained model directory)")
        if not self.tasks:
            raise RecipeError("the recipe needs at least one task under `tasks:`")
        names = [task.name for task in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TaskError(f"task names must be unique; repeated: {', '.join(dup)}")
        for task in self.tasks:
            task.validate()
            if not task.train:
                raise TaskError(f"task {task.name!r} has no `train:` data")
        for name in ("steps", "batch_size", "log_every", "tasks_per_step", "eval_examples", "eval_batch_size"):
            if getattr(t, name) < 1:
                raise RecipeError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if not t.lr > 0:
            raise RecipeError(f"train.lr must be > 0, got {t.lr}")
        if t.save_every < 0 or t.keep_checkpoints < 1:
            raise RecipeError(f"train.save_every must be >= 0 and train.keep_checkpoints >= 1, got "
                              f"{t.save_every} and {t.keep_checkpoints}")
        if t.method not in METHODS:
            raise RecipeError(f"unknown train.method {t.method!r}; choose one of {', '.join(METHODS)}")
        if t.init not in ("pretrained", "scratch"):
            raise RecipeError(f"train.init must be 'pretrained' or 'scratch', got {t.init!r}")
        if t.sampling not in SAMPLING:
            raise RecipeError(f"unknown train.sampling {t.sampling!r}; choose one of {', '.join(SAMPLING)}")
        if w.strategy not in STRATEGIES:
            raise RecipeError(f"unknown weighting.strategy {w.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.vision.validate()
        if t.method == "frozen" and any(task.type in ("generation", "chat", "vqa") for task in self.tasks):
            raise RecipeError("generation tasks train the trunk and its LM head; use train.method full or lora")
        if self.privacy is not None:
            self.privacy.validate()
            if len(self.tasks) != 1:
                raise RecipeError("privacy: DP-SGD fine-tunes one task at a time (its examples are the privacy "
                                  "unit); give one task")
            if w.strategy != "fixed" or w.pcgrad:
                raise RecipeError("privacy: loss weighting must be `fixed` without pcgrad (learned weights read "
                                  "the private losses)")
        if self.federated is not None:
            self.federated.validate()
            if len(self.tasks) != 1:
                raise RecipeError("federated: give one task (its training split is partitioned over the clients)")
        if w.strategy == "gradnorm" and t.method == "frozen":
            raise RecipeError("weighting.strategy gradnorm needs shared trainable weights; use train.method "
                              "full or lora")
        self.check_parallel(env_world_size())

    def check_parallel(self, world_size: int) -> None:
        """Raise RecipeError when the recipe cannot fine-tune on `world_size` processes (checked before any
        process group exists, so every rank reaches the same verdict and exits 2 instead of hanging)."""
        p = self.parallel
        if p.expert_parallel != 1:
            raise RecipeError(f"parallel.expert_parallel={p.expert_parallel!r}: fine-tuning keeps every expert on "
                              "every rank (1); expert parallelism is for pretraining")
        check_parallel(p, world_size, self.train.batch_size, n_routed_experts=0)
        if p.strategy != "ddp":
            raise RecipeError(f"parallel.strategy {p.strategy!r}: fine-tuning runs on several processes with "
                              "strategy ddp (replicated weights); fsdp is for pretraining")
        if p.mixed_precision != "none":
            raise RecipeError("parallel.mixed_precision applies to FSDP2 (pretraining); fine-tuning uses train.dtype")
        if world_size > 1 and (self.privacy is not None or self.federated is not None):
            mode = "privacy (DP-SGD)" if self.privacy is not None else "federated"
            raise RecipeError(f"{mode} fine-tuning runs on one process; drop --nproc / torchrun")


def _task_from_dict(raw: Any, i: int, mode_defaults: dict[str, dict[str, Any]] | None = None) -> TaskRecipe:
    """One `tasks:` entry; `mode_defaults` (a recipe with `privacy:` or `federated:`: DP_TASK_DEFAULTS,
    FEDERATED_TASK_DEFAULTS): unset keys take the defaults of its type."""
    where = f"tasks[{i}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with name, type and train")
    raw = dict(raw)
    train = raw.get("train")
    if isinstance(train, str) and train.startswith("builtin:"):
        try:
            defaults = builtin_defaults(train)
        except SeekformerError as e:
            raise TaskError(f"{where}: {e}") from None
        raw.setdefault("type", defaults["type"])
        if raw["type"] == defaults["type"] and defaults.get("labels") is not None:
            raw.setdefault("labels", defaults["labels"])
        raw.setdefault("name", train.split(":")[1])
    if mode_defaults:
        raw = {**mode_defaults.get(raw.get("type"), {}), **raw}
    return build_section(TaskRecipe, raw, where)


def _task_overrides(d: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply --base/--out and --tasks.NAME.key overrides to `d`; return the rest."""
    rest, i = [], 0
    while i < len(overrides):
        tok = overrides[i]
        key, has_eq = (tok[2:].split("=", 1)[0], "=" in tok) if tok.startswith("--") else ("", False)
        if key in ("base", "out") or key.startswith("tasks."):
            if has_eq:
                raw, i = tok.split("=", 1)[1], i + 1
            elif i + 1 < len(overrides):
                raw, i = overrides[i + 1], i + 2
            else:
                raise RecipeError(f"override {tok} needs a value")
            value = yaml.safe_load(raw)
            if key in ("base", "out"):
                d[key] = str(value)
                continue
            parts = key.split(".")
            if len(parts) != 3:
                raise RecipeError(f"override --{key} must look like --tasks.NAME.key")
            match = [t for t in d.get("tasks") or [] if isinstance(t, dict) and t.get("name", "") == parts[1]]
            if not match:
                raise RecipeError(f"override --{key}: no task named {parts[1]!r} in the recipe")
            match[0][parts[2]] = value
            continue
        rest.append(tok)
        i += 1
    return rest


def finetune_recipe_from_dict(d: dict[str, Any]) -> FinetuneRecipe:
    """Build and validate a FinetuneRecipe from a parsed YAML mapping (unknown keys raise RecipeError)."""
    if not isinstance(d, dict):
        raise RecipeError("a fine-tuning recipe must be a YAML mapping with base, out, tasks, train")
    unknown = set(d) - {"base", "out", "tasks", "train", "weighting", "lora", "vision", "privacy", "federated",
                        "parallel"}
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(sorted(unknown))}; valid: base, out, tasks, train, "
                          "weighting, lora, vision, privacy, federated, parallel")
    tasks = d.get("tasks") or []
    if not isinstance(tasks, list):
        raise RecipeError("`tasks:` must be a list of task mappings")
    for key in ("base", "out"):
        if key in d and not isinstance(d[key], str):
            raise RecipeError(f"`{key}:` must be a path, got {d[key]!r}")
    train = d.get("train")
    # privacy / federated runs: train keys the recipe leaves unset take that mode's defaults
    private = d.get("privacy") is not None
    if d.get("federated") is not None and (train is None or isinstance(train, dict)):
        train = {**FEDERATED_TRAIN_DEFAULTS, **(train or {})}
    task_defaults = (DP_TASK_DEFAULTS if private else FEDERATED_TASK_DEFAULTS if d.get("federated") is not None
                     else None)
    defaulted: tuple[str, ...] = ()
    if private and (train is None or isinstance(train, dict)):
        defaulted = tuple(k for k in private_train_defaults(None) if k not in (train or {}))
        train = private_train_defaults(train)
    r = FinetuneRecipe(base=d.get("base") or "", out=d.get("out") or "runs/finetune",
                       tasks=[_task_from_dict(t, i, task_defaults) for i, t in enumerate(tasks)],
                       train=build_section(FinetuneTrainRecipe, train, "train"),
                       weighting=build_section(WeightingRecipe, d.get("weighting"), "weighting"),
                       lora=build_section(LoraRecipe, d.get("lora"), "lora"),
                       vision=build_section(VisionRecipe, d.get("vision"), "vision"),
                       privacy=build_section(PrivacyRecipe, d["privacy"], "privacy")
                       if d.get("privacy") is not None else None,
                       federated=build_section(FederatedRecipe, d["federated"], "federated")
                       if d.get("federated") is not None else None,
                       parallel=build_section(ParallelRecipe, d.get("parallel"), "parallel"))
    r.validate()
    r.dp_defaulted = defaulted  # train keys a privacy run took from the DP defaults (not a recipe key)
    return r


def load_finetune_recipe(path_or_name: str, overrides: list[str] | None = None) -> FinetuneRecipe:
    """Read a recipe file (or a builtin recipe name, e.g. finetune_builtin) and apply overrides."""
    d = read_recipe_dict(path_or_name)
    if not isinstance(d, dict):
        raise RecipeError(f"recipe {path_or_name} must be a YAML mapping")
    d = {k: ([dict(t) if isinstance(t, dict) else t for t in v] if k == "tasks" and isinstance(v, list) else v)
         for k, v in d.items()}
    rest = _task_overrides(d, list(overrides or []))
    return finetune_recipe_from_dict(apply_overrides(d, rest))


__all__ = ["VisionRecipe", "FinetuneRecipe", "FinetuneTrainRecipe", "WeightingRecipe", "LoraRecipe", "load_finetune_recipe",
           "finetune_recipe_from_dict", "METHODS", "SAMPLING"]
