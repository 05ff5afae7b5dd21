"""The multi-task fine-tuning loop: `finetune(recipe)` -> FinetuneResult.

Each step trains the tasks of the step (all of them, or `tasks_per_step` drawn by size / temperature):
for each task, one batch, forward, backward of w_i * L_i (w from the weighting strategy); the task's
gradient on the shared trunk parameters is kept apart (g_i), then the g_i are summed (or combined with
PCGrad) into the trunk's gradient; heads get their own gradients directly. Then clipping, AdamW, the
MoE balancing-bias update (full fine-tuning only) and the weighting strategy's update.

Output directory (OUT = recipe.out):

    OUT/config.json, model.safetensors, tokenizer.json, ...   the trunk (a plain HF model dir, LoRA merged)
    OUT/heads.safetensors, OUT/multitask.json                 task heads and task declarations
    OUT/recipe.yaml, OUT/results.json                         resolved recipe; final validation/test metrics
    OUT/metrics.jsonl, OUT/tensorboard/, OUT/finetune.png     per-task losses, weights, gradient norms
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, RecipeError
from .checkpointing import RunCheckpoints, StopSignals, TrainingInterrupted, latest_checkpoint
from .logs import MetricsLogger, read_metrics
from .multitask_recipe import FinetuneRecipe
from .optim import build_scheduler, param_groups
from .weighting import build_weighting, pcgrad, sampling_probs

RESULTS_FILE = "results.json"
# Recipe keys a resumed fine-tune may change (how long, how often to log/evaluate/save, where to run).
RESUMABLE_KEYS = frozenset({"out", "train.steps", "train.resume", "train.overwrite", "train.save_every",
                            "train.keep_checkpoints", "train.progress", "train.log_every", "train.eval_every",
                            "train.eval_examples", "train.eval_batch_size", "train.validate", "train.test",
                            "train.threads", "train.device"})
PLOT_FILE = "finetune.png"


@dataclass
class FinetuneResult:
    """What `finetune` returns: the output directory, steps run, seconds, and split -> task -> metrics."""

    out_dir: Path
    steps: int
    seconds: float
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # split -> task -> metrics


@dataclass
class TaskData:
    """A task's declaration (dict, as saved in multitask.json) and its encoded splits."""

    decl: dict[str, Any]
    train: list[dict]
    validation: list[dict] | None = None
    test: list[dict] | None = None


def prepare_tasks(recipe: FinetuneRecipe, tokenizer, image=None) -> dict[str, TaskData]:
    """Read, validate and encode every task's splits (errors name the task, file and record).
    `image` (a models.vision_lm.VisionSetup) is needed by image tasks."""
    from ..data.tasks import Encoder, infer_labels, load_split, resolve_splits

    out = {}
    seed = recipe.train.seed
    for task in recipe.tasks:
        splits = resolve_splits(task)
        train_records = load_split(task, splits["train"], "train", task.max_train_examples, seed)
        labels = infer_labels(task, train_records, splits["train"]) \
            if task.type in ("classification", "tagging", "image_classification") else None
        decl = {**task.to_dict(), **{s: splits.get(s) for s in ("train", "validation", "test")}, "labels": labels}
        enc = Encoder(task, tokenizer, labels, image=image)
        data = TaskData(decl, enc.encode(train_records, splits["train"], training=True))
        for split in ("validation", "test"):
            if split in splits:
                recs = load_split(task, splits[split], split, task.max_eval_examples, seed)
                setattr(data, split, enc.encode(recs, splits[split], training=False))
        out[task.name] = data
    return out


def load_base(recipe: FinetuneRecipe):
    """(tokenizer, SeekForCausalLM) of `recipe.base` (random weights with train.init scratch)."""
    from ..checkpoint import check_model_dir, load_config
    from ..models.causal_lm import SeekForCausalLM
    from ..tokenizer import SeekTokenizer

    base = check_model_dir(recipe.base)
    tokenizer = SeekTokenizer.load(base)
    if recipe.train.init == "scratch":
        lm = SeekForCausalLM(load_config(base))
        lm.reset_parameters(seed=recipe.train.seed)
    else:
        lm = SeekForCausalLM.from_pretrained(base)
    return tokenizer, lm.to(recipe.train.device)


class MultiTaskTrainer:
    """Fine-tunes a SeekForMultiTask as a FinetuneRecipe describes: `MultiTaskTrainer(r).run()`."""

    def __init__(self, recipe: FinetuneRecipe, console=None) -> None:
        from rich.console import Console

        recipe.validate()
        self.recipe, self.t = recipe, recipe.train
        self.out = Path(recipe.out)
        self.console = console or Console(stderr=True)
        self.on_step = None  # called after each step (and its checkpoint) with the trainer

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Load the base model and tokenizer, encode the tasks, build heads, optimizer, schedule, weighting and task
        streams; resume when train.resume (after RunCheckpoints checked the checkpoint is this recipe's)."""
        from ..models.multitask import SeekForMultiTask

        r, t = self.recipe, self.t
        if t.device.startswith("cuda") and not torch.cuda.is_available():
            raise RecipeError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
        if t.threads:
            torch.set_num_threads(t.threads)
        self.checkpoints = RunCheckpoints(self.out, "finetune", r.to_dict(), RESUMABLE_KEYS, self.console)
        resume_from = self.checkpoints.start(t.resume, t.overwrite)
        torch.manual_seed(t.seed)
        self.tokenizer, lm = load_base(r)
        from .vision import configure_vision, vision_for_recipe

        self.vision = vision_for_recipe(r, self.tokenizer, lm)  # None without image tasks (training/vision.py)
        limit = lm.config.max_position_embeddings
        for task in r.tasks:
            if task.max_length > limit:
                raise RecipeError(f"task {task.name!r}: max_length {task.max_length} exceeds the base model's context "
                                  f"({limit} positions); lower it")
        self.data = prepare_tasks(r, self.tokenizer, self.vision)
        if lm.config.vocab_size < self.tokenizer.vocab_size:
            raise RecipeError(f"the base model's vocabulary ({lm.config.vocab_size}) is smaller than its tokenizer's")
        decls = [d.decl for d in self.data.values()]
        self.model = SeekForMultiTask(lm, decls) if self.vision is None else self.vision.build(lm, decls, t.seed)
        if t.method == "lora":
            n = self.model.add_lora(r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.targets)
            self.console.print(f"LoRA: {n:,} adapter parameters (trunk frozen)")
        elif t.method == "frozen":
            for p in self.model.lm.parameters():
                p.requires_grad_(False)
        vision_groups = configure_vision(self.model, r) if self.vision is not None else []
        self.model.train()
        self.shared = self.model.trunk_parameters()
        names = {id(p): n for n, p in self.model.lm.named_parameters()}
        last = f"model.layers.{lm.config.num_hidden_layers - 1}."
        self.layer_mask = self._flat_mask([names[id(p)].startswith(last) for p in self.shared])
        head_lr = t.head_lr if t.head_lr is not None else 10 * t.lr
        groups = []
        for module, lr in ((self.model.lm, t.lr), (self.model.heads, head_lr)):
            for g in param_groups(module, t.weight_decay):
                if g["params"]:
                    groups.append({**g, "lr": lr})
        groups += vision_groups
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
        w = r.weighting
        self.names = list(self.data)
        self.weighting = build_weighting(w.strategy, self.names, {n: d.decl["weight"] for n, d in self.data.items()},
                                         alpha=w.alpha, lr=w.lr, temperature=w.temperature, window=w.window)
        from ..data.tasks import TaskBatches

        self.loaders = {n: TaskBatches(d.train, d.decl["type"], t.batch_size, self.tokenizer.pad_token_id,
                                       seed=t.seed + i) for i, (n, d) in enumerate(self.data.items())}
        self.probs = None if t.sampling == "all" else sampling_probs({n: len(d.train) for n, d in self.data.items()},
                                                                     t.sampling, t.temperature)
        self.rng = random.Random(t.seed)
        self.step = 0
        self.resumed_from = None
        if resume_from is not None:
            self._resume(resume_from)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: weights (heads, LoRA adapters, MoE biases),
        optimizer, schedule, loss weighting, data streams and random generators."""
        from ..data.tasks import random_state

        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "weighting": self.weighting.checkpoint_state(),
                "loaders": {n: b.state_dict() for n, b in self.loaders.items()},
                "rng": random_state(self.rng), "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N (trainer_state/state.pt, recipe.yaml, run.json) atomically, point
        `latest` at it, prune this run's older ones."""
        return self.checkpoints.save(self.step, self.checkpoint_state(), keep=self.t.keep_checkpoints,
                                     recipe=self.recipe.to_dict())

    def _resume(self, found: Path) -> None:
        """Restore everything `checkpoint_state` saved from `found` (which RunCheckpoints checked is ours)."""
        from ..data.tasks import set_random_state

        state = self.checkpoints.load_state(found)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.weighting.load_checkpoint_state(state["weighting"])
            for n, b in self.loaders.items():
                b.load_state_dict(state["loaders"][n])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"the trainer state in {found} does not fit this run ({str(e).splitlines()[0]})"
                                  ) from None
        set_random_state(self.rng, state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.resumed_from = found
        self.console.print(f"resumed from {found} at step {self.step}")

    def _flat_mask(self, flags: list[bool]) -> torch.Tensor:
        return torch.cat([torch.full((p.numel(),), f, dtype=torch.bool) for p, f in zip(self.shared, flags)]) \
            if self.shared else torch.zeros(0, dtype=torch.bool)

    # ------------------------------------------------------------------ one step
    def step_tasks(self) -> list[str]:
        """The tasks this step trains: all of them, or `tasks_per_step` distinct ones drawn with the sampling
        probabilities."""
        if self.probs is None:
            return list(self.names)
        k = min(self.t.tasks_per_step, len(self.names))
        pool, weights, chosen = list(self.names), [self.probs[n] for n in self.names], []
        for _ in range(k):
            i = self.rng.choices(range(len(pool)), weights=weights)[0]
            chosen.append(pool.pop(i))
            weights.pop(i)
        return chosen

    def _take_shared_grad(self) -> torch.Tensor:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.shared]) \
            if self.shared else torch.zeros(0)
        for p in self.shared:
            p.grad = None
        return flat

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the step's tasks; returns the log record."""
        tasks = self.step_tasks()
        weights = self.weighting.weights()
        self.optimizer.zero_grad(set_to_none=True)
        losses, grads, rec = {}, {}, {}
        for name in tasks:
            batch = {k: v.to(self.t.device) for k, v in self.loaders[name].next_batch().items()}
            out = self.model(name, **batch)
            loss = weights[name] * out.loss
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            loss.backward()
            losses[name] = float(out.loss.detach())
            grads[name] = self._take_shared_grad()
        layer_norms = {}
        if self.shared:
            for n, g in grads.items():
                rec[f"grad_norm/{n}"] = float(g.norm())
                layer_norms[n] = float(g[self.layer_mask].norm()) / max(weights[n], 1e-12)
            if self.recipe.weighting.pcgrad and len(grads) > 1:
                total, conflicts = pcgrad(grads, seed=self.t.seed + self.step)
                rec["pcgrad_projections"] = conflicts
            else:
                total = torch.stack(list(grads.values())).sum(0)
            offset = 0
            for p in self.shared:
                p.grad = total[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        rec["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        gamma = self.model.config.aux_free_bias_update_rate if self.t.method == "full" else 0.0
        for _, moe in self.model.lm.moe_layers():
            moe.update_bias(gamma)
        self.weighting.update(losses, layer_norms if self.weighting.needs_layer_grad_norms else None)
        self.step += 1
        rec.update({f"loss/{n}": v for n, v in losses.items()})
        rec["loss"] = sum(losses.values()) / len(losses)
        rec.update(self.weighting.state())
        return rec

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, max_examples: int | None = None) -> dict[str, dict[str, float]]:
        """{task: metrics} on `split` (validation or test) of every task that has it, at most `max_examples` each."""
        from ..evaluation.metrics import evaluate_task

        out = {}
        for name, d in self.data.items():
            examples = getattr(d, split)
            if examples:
                examples = examples[:max_examples] if max_examples else examples
                out[name] = evaluate_task(self.model, self.tokenizer, d.decl, examples, self.t.eval_batch_size)
        self.model.train()
        return out

    def extra_output_files(self) -> dict[str, str]:
        """Hook for subclasses (e.g. privacy.json of DP-SGD): more files written into OUT with the model."""
        return {}

    def save(self, results: dict[str, Any]) -> None:
        """Write the fine-tuned model directory (trunk, heads, multitask.json, tokenizer, recipe.yaml, results.json)."""
        files = {"recipe.yaml": self.recipe.to_yaml(), RESULTS_FILE: json.dumps(results, indent=2) + "\n",
                 **self.extra_output_files()}
        self.model.save_pretrained(self.out, tokenizer=self.tokenizer, extra_files=files)

    # ------------------------------------------------------------------ loop
    def run(self) -> FinetuneResult:
        """Train to train.steps (logging, periodic evaluation and checkpoints; SIGINT/SIGTERM save and raise
        TrainingInterrupted), then evaluate, save and plot."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from ..evaluation.metrics import PRIMARY_METRIC

        if not hasattr(self, "model"):
            self.prepare()
        t = self.t
        self.out.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.out, resume_step=self.step if self.resumed_from is not None else None)
        start = time.perf_counter()
        columns = [TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        with StopSignals() as stop, Progress(*columns, console=self.console, disable=not t.progress) as progress:
            bar = progress.add_task("finetune", total=t.steps, completed=self.step, loss=float("nan"))
            window: dict[str, list[float]] = {}
            while self.step < t.steps:
                rec = self.train_step()
                for k, v in rec.items():
                    if k.startswith(("loss", "grad_norm")):
                        window.setdefault(k, []).append(v)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    rec.update({k: sum(v) / len(v) for k, v in window.items()})  # means over the log window
                    window = {}
                    logger.log(self.step, rec)
                progress.update(bar, completed=self.step, loss=rec["loss"])
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    val = self.evaluate("validation", t.eval_examples)
                    logger.log(self.step, _flatten("val", val))
                    progress.console.print(f"step {self.step}: " + _summary(val, PRIMARY_METRIC, self.data))
                if t.save_every and (self.step % t.save_every == 0 or self.step == t.steps):
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self)
                if stop.received is not None:
                    logger.close()
                    saved = self.save_checkpoint() if self.checkpoints.last_saved_step != self.step else None
                    raise TrainingInterrupted(stop.received, saved or latest_checkpoint(self.out))
        results: dict[str, Any] = {"steps": self.step, "train_seconds": time.perf_counter() - start}
        if t.validate:
            results["validation"] = self.evaluate("validation")
            logger.log(self.step, _flatten("val", results["validation"]))
        if t.test:
            results["test"] = self.evaluate("test")
            logger.log(self.step, _flatten("test", results["test"]))
        logger.close()
        self.save(results)
        plot_multitask(self.out)
        for split in ("validation", "test"):
            if results.get(split):
                self.console.print(f"{split}: " + _summary(results[split], PRIMARY_METRIC, self.data))
        return FinetuneResult(self.out, self.step, time.perf_counter() - start,
                              {s: results[s] for s in ("validation", "test") if s in results})


def _flatten(prefix: str, res: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{task}/{k}": v for task, m in res.items() for k, v in m.items()}


def _summary(res: dict[str, dict[str, float]], primary: dict[str, str], data: dict[str, TaskData]) -> str:
    parts = []
    for name, m in res.items():
        key = primary[data[name].decl["type"]]
        parts.append(f"{name} {key} {m[key]:.3f}")
    return ", ".join(parts)


def plot_multitask(out_dir: str | Path) -> Path:
    """OUT/finetune.png: per-task training loss, loss weight, gradient norm, and validation metrics."""
    from ..figures import pyplot, save_figure

    plt = pyplot()

    out = Path(out_dir)
    records = read_metrics(out)
    panels = [("loss/", "training loss (per task)"), ("weight/", "loss weight"),
              ("grad_norm/", "gradient norm on the shared trunk")]
    from ..evaluation.metrics import PRIMARY_METRIC

    primary = tuple(f"/{m}" for m in PRIMARY_METRIC.values())
    if any(k.startswith("val/") and k.endswith(primary) for r in records for k in r):
        panels.append(("val/", "validation metric (accuracy, token acc., chrF or F1)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], panels):
        keys = sorted({k for r in records for k in r if k.startswith(prefix)
                       and (prefix != "val/" or k.endswith(primary))})
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r and isinstance(r[k], (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-" if prefix == "val/" else "-", label=k[len(prefix):], lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=8)
        if prefix in ("loss/", "grad_norm/") and keys and all(r[k] > 0 for r in records for k in keys if k in r):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out / PLOT_FILE)


def finetune(recipe: FinetuneRecipe, console=None) -> FinetuneResult:
    """Prepare and run a `MultiTaskTrainer` for `recipe`; returns its FinetuneResult. Recipes with a
    `privacy:` or `federated:` section go through `training.finetune.finetune`, which dispatches."""
    trainer = MultiTaskTrainer(recipe, console=console)
    trainer.prepare()
    return trainer.run()



__all__ = ["MultiTaskTrainer", "FinetuneResult", "finetune", "prepare_tasks", "plot_multitask", "RESULTS_FILE"]
