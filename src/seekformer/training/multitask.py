"""The multi-task fine-tuning loop: `finetune(recipe)` -> FinetuneResult.

Each step trains the tasks of the step (all of them, or `tasks_per_step` drawn by size / temperature):
for each task, one batch, forward, backward of w_i * L_i (w from the weighting strategy); the task's
gradient on the shared trunk parameters is kept apart (g_i), then the g_i are summed (or combined with
PCGrad) into the trunk's gradient; heads get their own gradients directly. Then clipping, AdamW, the
MoE balancing-bias update (full fine-tuning only) and the weighting strategy's update.

Several processes (`seekformer finetune RECIPE --nproc N` or torchrun; `distributed.Parallel`): every rank
holds the whole model and draws the same global batch of each task; rank r runs its slice of the rows with
the task loss scaled to its share of the batch's loss units (target tokens, or rows), so the ranks' losses
sum to the 1-process loss. Each task's trunk gradient g_i is summed over ranks before PCGrad / gradient
norms see it, the heads' gradients once per step, the MoE expert loads before the bias update: every rank
then applies the 1-process update. (A manual all-reduce rather than DDP: DDP would average rather than sum,
reduce every task's gradient into one, and need find_unused_parameters for the heads a step leaves out.)
Rank 0 evaluates, writes checkpoints (the replicated state: any world size resumes it) and the model.

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

from ..distributed import Parallel
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
                            "train.threads", "train.device", "parallel.strategy", "parallel.backend",
                            "parallel.activation_checkpointing"})
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
        self.par = Parallel.single(recipe.parallel, recipe.train.device)  # joined in prepare()

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
        self.par = par = Parallel.from_env(r.parallel, t.device)
        if not par.is_main:
            self.console.quiet = True
        self.checkpoints = RunCheckpoints(self.out, "finetune", r.to_dict(), RESUMABLE_KEYS, self.console)
        # every rank reads the same verdict; only rank 0 cleans or deletes; rank 0's run id is everyone's
        resume_from = self.checkpoints.start(t.resume, t.overwrite, is_main=par.is_main)
        self.checkpoints.run_id = par.broadcast_object(self.checkpoints.run_id)
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
        if r.parallel.activation_checkpointing:
            from ..distributed.runtime import checkpoint_blocks

            checkpoint_blocks(self.model.lm)
        self.par.broadcast_module_(self.model)  # rank 0's weights everywhere (they already agree: same seed)
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
        shared = {id(p) for p in self.shared}
        self.unshared = [p for g in groups for p in g["params"] if id(p) not in shared]  # heads, vision, ...
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
        `latest` at it, prune this run's older ones. Several processes: every rank holds the same state
        (replicated weights, the same data streams), rank 0 writes it and the others wait."""
        target = None
        if self.par.is_main:
            target = self.checkpoints.save(self.step, self.checkpoint_state(), keep=self.t.keep_checkpoints,
                                           recipe=self.recipe.to_dict())
        self.checkpoints.last_saved_step = self.step
        self.par.barrier()
        return target if target is not None else self.out / "checkpoints" / f"step-{self.step:06d}"

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

    def _forward_share(self, name: str, batch: dict[str, torch.Tensor]):
        """This rank's part of one task's global batch: (TaskOutput, task loss, aux loss) with both losses
        scaled to the rank's share, so that summed over ranks they are the 1-process losses of the batch.

        The task loss is a mean over loss units (target tokens for generation / chat / vqa / tagging, rows
        otherwise), so it is scaled by this rank's units / the batch's units; the MoE balance loss is a mean
        over sequences, scaled by rows. A rank without rows (a batch smaller than the world) runs row 0 at
        weight 0 and leaves the expert loads as they were."""
        par, kind = self.par, self.data[name].decl["type"]
        if not par.distributed:
            out = self.model(name, **{k: v.to(self.t.device) for k, v in batch.items()})
            return out, out.loss, out.aux_loss
        n = batch["input_ids"].shape[0]
        units = _loss_units(kind, batch)  # [B]
        rows = par.rows(n)
        empty = rows.start == rows.stop
        mine = {k: v[rows] if not empty else v[:1] for k, v in batch.items()}
        unit_share = 0.0 if empty else float(units[rows].sum()) / max(1.0, float(units.sum()))
        row_share = (rows.stop - rows.start) / n
        loads = [m.load_counts.clone() for _, m in self.model.lm.moe_layers()] if empty else None
        out = self.model(name, **{k: v.to(self.t.device) for k, v in mine.items()})
        if loads is not None:
            for (_, m), c in zip(self.model.lm.moe_layers(), loads):
                m.load_counts.copy_(c)
        task = out.loss * unit_share if unit_share > 0 else out.logits.sum() * 0.0  # (a mean over 0 units: NaN)
        aux = out.aux_loss * row_share if out.aux_loss is not None else None
        return out, task, aux

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the step's tasks; returns the log record."""
        tasks = self.step_tasks()
        weights = self.weighting.weights()
        self.optimizer.zero_grad(set_to_none=True)
        losses, grads, rec = {}, {}, {}
        par = self.par
        for name in tasks:
            out, task_loss, aux = self._forward_share(name, self.loaders[name].next_batch())
            loss = weights[name] * task_loss
            if aux is not None:
                loss = loss + aux
            loss.backward()
            losses[name] = float(task_loss.detach())
            grads[name] = par.all_reduce_(self._take_shared_grad())  # the task's global trunk gradient
        losses = dict(zip(losses, par.sum(list(losses.values()))))  # the global batch's task losses
        par.sum_grads_(self.unshared)  # heads (and other unshared weights): one all-reduce per step
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
        par.reduce_loads(self.model.lm.moe_layers())  # the bias update sees every rank's tokens
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
        t, par = self.t, self.par
        main = par.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            logger = MetricsLogger(self.out, resume_step=self.step if self.resumed_from is not None else None)
        else:
            from .trainer import NullLogger

            logger = NullLogger()
        start = time.perf_counter()
        columns = [TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        with StopSignals() as stop, Progress(*columns, console=self.console,
                                             disable=not t.progress or not main) as progress:
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
                    if main:  # rank 0 evaluates, the others wait
                        val = self.evaluate("validation", t.eval_examples)
                        logger.log(self.step, _flatten("val", val))
                        progress.console.print(f"step {self.step}: " + _summary(val, PRIMARY_METRIC, self.data))
                    par.barrier()
                if t.save_every and (self.step % t.save_every == 0 or self.step == t.steps):
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self)
                # SIGINT/SIGTERM: save and stop (rank 0's signal decides for every rank)
                signum = par.broadcast_object(stop.received) if par.distributed else stop.received
                if signum is not None:
                    logger.close()
                    saved = self.save_checkpoint() if self.checkpoints.last_saved_step != self.step else None
                    raise TrainingInterrupted(signum, saved or latest_checkpoint(self.out))
        results: dict[str, Any] = {"steps": self.step, "train_seconds": time.perf_counter() - start}
        if main:  # rank 0 evaluates and writes the model; the others wait and return its results
            if t.validate:
                results["validation"] = self.evaluate("validation")
                logger.log(self.step, _flatten("val", results["validation"]))
            if t.test:
                results["test"] = self.evaluate("test")
                logger.log(self.step, _flatten("test", results["test"]))
            logger.close()
            self.save(results)
            plot_multitask(self.out)
        results = par.broadcast_object(results)
        for split in ("validation", "test"):
            if results.get(split):
                self.console.print(f"{split}: " + _summary(results[split], PRIMARY_METRIC, self.data))
        return FinetuneResult(self.out, self.step, time.perf_counter() - start,
                              {s: results[s] for s in ("validation", "test") if s in results})


def _loss_units(kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] how many terms each row adds to the task loss's mean: its target tokens for the token-level losses
    (generation, chat and vqa predict labels[:, 1:]; tagging labels every token), else 1 per row."""
    labels = batch.get("labels")
    if kind in ("generation", "chat", "vqa") and labels is not None:
        return (labels[:, 1:] != -100).sum(1)
    if kind == "tagging" and labels is not None:
        return (labels != -100).sum(1)
    return torch.ones(batch["input_ids"].shape[0], dtype=torch.long)


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
    try:
        trainer.prepare()
        return trainer.run()
    finally:
        trainer.par.close()



__all__ = ["MultiTaskTrainer", "FinetuneResult", "finetune", "prepare_tasks", "plot_multitask", "RESULTS_FILE"]
