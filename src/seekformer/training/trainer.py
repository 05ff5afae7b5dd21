"""The pretraining loop: tokenizer -> token shards -> model -> AdamW steps with balancing, eval, checkpoints.

Output directory layout (OUT = recipe.train.out):

    OUT/config.json, model.safetensors, tokenizer.json, ...   the latest model (a Hugging Face model dir)
    OUT/recipe.yaml                                          the resolved recipe
    OUT/checkpoints/step-000500/{model files, trainer_state/state.pt, recipe.yaml}
    OUT/checkpoints/latest                                   name of the newest complete checkpoint
    OUT/metrics.jsonl, OUT/tensorboard/, OUT/training.png    logs and the plot
    OUT/data/                                                token shards (reused across runs)

Checkpoints are written and resumed by `checkpointing.RunCheckpoints` (atomic step directories, the `latest`
pointer, pruning by step within this run, a fresh run refusing an OUT that holds another run's checkpoints).
Resuming restores weights (incl. the routers' balancing biases), optimizer, scheduler, RNG and data
position: the loss at every later step equals that of an uninterrupted run. SIGINT/SIGTERM during `run()`
finish the current step, save a checkpoint and raise `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import load_config, save_model, write_model_files
from ..config import SeekConfig
from ..distributed import Parallel, check_parallel, env_world_size
from ..distributed.config import ParallelRecipe
from ..errors import CheckpointError, ConfigError, DataError, RecipeError
from ..fsio import atomic_write_text
from ..models.causal_lm import SeekForCausalLM
from ..models.loading import parse_dtype
from ..nn.moe import load_stats
from ..runtime import tune_malloc
from .checkpointing import CHECKPOINTS, RunCheckpoints, StopSignals, TrainingInterrupted, latest_checkpoint
from .logs import MetricsLogger, plot_training
from .optim import build_optimizer, build_scheduler
from .recipe import Recipe

SHARDED_STATE = "dcp"  # trainer_state/dcp: model + optimizer through torch.distributed.checkpoint
# Config fields that may change between a checkpoint and a resumed run (training knobs, not architecture).
RESUMABLE_CHANGES = {"mtp_loss_weight", "aux_free_bias_update_rate", "seq_aux_loss_alpha", "router_z_loss_coef"}
# Recipe keys a resumed run may change: how long, how often to log/evaluate/save, where to run, and the
# training knobs above. Every other key must match the checkpoint's recipe.
RESUMABLE_KEYS = frozenset({"train.out", "train.steps", "train.max_minutes", "train.warmup_steps", "train.resume",
                            "train.overwrite", "train.save_every", "train.keep_checkpoints", "train.progress",
                            "train.log_every", "train.eval_every", "train.eval_batches", "train.threads",
                            "train.device", "data.cache_dir", *(f"model.{k}" for k in RESUMABLE_CHANGES),
                            # how the processes split the work: a checkpoint reshards onto any layout
                            *(f"parallel.{f.name}" for f in dataclasses.fields(ParallelRecipe))})


@dataclass
class TrainResult:
    """What `Trainer.run` returns: output directory, steps, tokens, (step, loss) curves, seconds, whether it stopped
    early."""

    out_dir: Path
    steps: int
    tokens: int
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def check_resume_config(expected: SeekConfig, found: SeekConfig, where: Path) -> None:
    """Raise CheckpointError when the checkpoint's model config differs from the recipe's beyond RESUMABLE_CHANGES."""
    a, b = expected.to_dict(), found.to_dict()
    diffs = [f"{k}: recipe {a[k]!r} vs checkpoint {b.get(k)!r}" for k in sorted(a)
             if k not in RESUMABLE_CHANGES and a[k] != b.get(k)]
    if diffs:
        raise CheckpointError(f"the recipe's model config does not match the checkpoint {where} "
                              f"({'; '.join(diffs[:3])}); resume with the same model settings or use a new train.out")


class Trainer:
    """Pretrains a SeekForCausalLM as a Recipe describes. `Trainer(recipe).run()` -> TrainResult."""

    def __init__(self, recipe: Recipe, console=None, on_eval: Callable[[int, float], None] | None = None,
                 on_step: Callable[[Trainer], None] | None = None) -> None:
        from rich.console import Console

        self.recipe = recipe
        self.t = recipe.train
        self.out = Path(self.t.out)
        self.console = console or Console()
        self.on_eval = on_eval
        self.on_step = on_step  # called after every optimizer step (e.g. to re-plan a time budget)
        self.eval_seconds = 0.0  # duration of the last validation pass
        self._interval_counts: dict[str, torch.Tensor] = {}  # expert loads since the last log record
        self._validate()
        self.par = Parallel.single(recipe.parallel, recipe.train.device)  # joined in prepare()

    def _validate(self) -> None:
        t = self.t
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise RecipeError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        try:
            self.autocast_dtype = parse_dtype(t.dtype, allowed=("fp32", "bf16"))
        except ConfigError as e:
            raise RecipeError(f"train.dtype: {e}") from None
        if not t.lr > 0:
            raise RecipeError(f"train.lr must be > 0, got {t.lr}")
        if t.device.startswith("cuda") and not torch.cuda.is_available():
            raise RecipeError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
        # before any process group exists: every rank reaches the same verdict and exits 2, no hang
        check_parallel(self.recipe.parallel, env_world_size(), t.batch_size,
                       self.recipe.model_config().n_routed_experts)

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Tokenizer, token shards, model, optimizer and schedule; on resume also the checkpoint's weights and trainer
        state (RunCheckpoints checks it belongs to this recipe; a fresh run refuses an OUT with another run's
        checkpoints)."""
        from ..data.corpus import check_sources, iter_documents
        from ..data.shards import PackedBatches, build_shards
        from ..tokenizer import SeekTokenizer

        r, t = self.recipe, self.t
        if t.threads:
            torch.set_num_threads(t.threads)
        tune_malloc()  # keep freed memory for reuse: no page faults on every step's large temporaries
        self.par = par = Parallel.from_env(r.parallel, t.device)
        if not par.is_main:
            self.console.quiet = True
        self.checkpoints = RunCheckpoints(self.out, "pretrain", r.to_dict(), RESUMABLE_KEYS, self.console)
        # every rank reads the same verdict; only rank 0 cleans or deletes; rank 0's run id is everyone's
        resume_from = self.checkpoints.start(t.resume, t.overwrite, is_main=par.is_main)
        self.checkpoints.run_id = par.broadcast_object(self.checkpoints.run_id)
        check_sources(r.data.sources)

        # tokenizer: the checkpoint's on resume, else a given one, else train one on the data
        if resume_from is not None:
            self.tokenizer = SeekTokenizer.load(resume_from)
        elif r.tokenizer.path:
            self.tokenizer = SeekTokenizer.load(r.tokenizer.path)
        else:
            if par.is_main:
                self.console.print(f"training a byte-level BPE tokenizer (vocab {r.tokenizer.vocab_size}) ...")
                docs = iter_documents(r.data.sources, text_key=r.data.text_key)
                if r.tokenizer.max_train_docs:
                    docs = (d for i, d in zip(range(r.tokenizer.max_train_docs), docs))
                self.tokenizer = SeekTokenizer.train(texts=docs, vocab_size=r.tokenizer.vocab_size,
                                                     min_frequency=r.tokenizer.min_frequency)
            files = par.broadcast_object(self.tokenizer.files() if par.is_main else None)
            if not par.is_main:  # the same tokenizer on every rank: rank 0's files
                with tempfile.TemporaryDirectory() as d:
                    for fname, text in files.items():
                        Path(d, fname).write_text(text)
                    self.tokenizer = SeekTokenizer.load(d)
        tok = self.tokenizer
        self.config = r.model_config(tok.vocab_size, {"pad_token_id": tok.pad_token_id,
                                                      "bos_token_id": tok.bos_token_id,
                                                      "eos_token_id": tok.eos_token_id})
        tok.model_max_length = self.config.max_position_embeddings
        if self.config.vocab_size < tok.vocab_size:
            raise RecipeError(f"model.vocab_size {self.config.vocab_size} is smaller than the tokenizer's "
                              f"{tok.vocab_size}")

        cache = Path(r.data.cache_dir) if r.data.cache_dir else self.out / "data"
        self.console.print(f"tokenizing {', '.join(map(str, r.data.sources))} -> {cache} ...")
        with par.first_then_others():  # rank 0 builds the shards, the others reuse them
            self.shards = build_shards(r.data.sources, tok, cache, val_fraction=r.data.val_fraction, seed=t.seed,
                                       text_key=r.data.text_key)
        # train.batch_size is the global batch: rank r reads rows [r*b, (r+1)*b) of every step's windows
        self.loader = PackedBatches(self.shards, "train", t.seq_len, t.batch_size // par.world_size, seed=t.seed,
                                    rank=par.rank, world_size=par.world_size)
        if self.shards.split_tokens("validation") < t.seq_len + 1:
            raise DataError(f"the validation split has {self.shards.split_tokens('validation')} tokens, fewer than "
                            f"one window of train.seq_len+1 = {t.seq_len + 1}; raise data.val_fraction or add text")

        torch.manual_seed(t.seed)
        if resume_from is not None:
            check_resume_config(self.config, load_config(resume_from), resume_from)
            self.model = SeekForCausalLM.from_pretrained(resume_from, device=t.device)
            # the training knobs the recipe may change, updated IN the config object the modules read
            update_config(self.model.config, self.config, RESUMABLE_CHANGES)
            self.config = self.model.config
        else:
            self.model = SeekForCausalLM(self.config)
            self.model.reset_parameters(seed=t.seed)
            self.model.to(t.device)
        self.model.train()
        self.fwd = par.wrap(self.model)  # the module to call: DDP / FSDP2 / expert-parallel, or the model
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                         impl=par.optimizer_impl)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
        self.step = 0
        self.tokens_seen = 0
        if resume_from is not None:
            state = self.checkpoints.load_state(resume_from)
            sharded = resume_from / "trainer_state" / SHARDED_STATE
            if (sharded / ".metadata").is_file():  # any world size wrote it: DCP reshards on load
                par.load_state(sharded, self.model, self.optimizer)
            elif "optimizer" in state and not par.distributed:
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                raise CheckpointError(f"{resume_from} has no sharded trainer state ({SHARDED_STATE}/); it cannot "
                                      "resume on several processes: resume it on one")
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["data"])
            torch.set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.tokens_seen = int(state["tokens"])
            self.console.print(f"resumed from {resume_from} at step {self.step}")
        self.resumed_from = resume_from
        if par.is_main:
            atomic_write_text(self.out / "recipe.yaml", r.to_yaml())
            self.logger = MetricsLogger(self.out, resume_step=self.step if resume_from is not None else None)
        else:
            self.logger = NullLogger()

    # ------------------------------------------------------------------ pieces
    def autocast(self):
        """The autocast context of train.dtype (a no-op for fp32)."""
        if self.autocast_dtype != torch.float32:
            return torch.autocast(device_type=torch.device(self.t.device).type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation windows."""
        from ..data.shards import iter_eval_batches

        t0 = time.perf_counter()
        self.model.eval()
        total, n = 0.0, 0
        w, r = self.par.world_size, self.par.rank
        for batch in iter_eval_batches(self.shards, "validation", self.t.seq_len, self.t.batch_size,
                                       max_batches=self.t.eval_batches):
            per = -(-batch.shape[0] // w)  # this rank's rows; a rank with none runs row 0 at weight 0
            mine, weight = batch[r * per:(r + 1) * per], 1.0
            if mine.shape[0] == 0:
                mine, weight = batch[:1], 0.0
            mine = mine.to(self.t.device)
            with self.autocast():
                out = self.fwd(mine, labels=mine)
            total += float(out.lm_loss) * mine.shape[0] * weight
            n += mine.shape[0] * weight
        if self.par.distributed:
            total, n = (v * w for v in self.par.mean([total, n]))
        self.model.train()
        self.eval_seconds = time.perf_counter() - t0
        return total / max(1, n)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; then the aux-loss-free bias update."""
        t = self.t
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {"loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        extra: dict[str, float] = {}
        par = self.par
        for i in range(t.grad_accum):
            batch = self.loader.next_batch().to(t.device)  # this rank's rows of the global batch
            with par.accumulate(last=i == t.grad_accum - 1):  # no gradient all-reduce until the last one
                with self.autocast():
                    out = self.fwd(batch, labels=batch, **({"return_hidden": True} if self.needs_hidden else {}))
                    loss, parts = self.loss(batch, out)
                (loss / t.grad_accum).backward()
            for k, v in parts.items():
                extra[k] = extra.get(k, 0.0) + v / t.grad_accum
            sums["loss"] += out.lm_loss.item() / t.grad_accum
            if out.mtp_loss is not None:
                sums["mtp_loss"] += out.mtp_loss.item() / t.grad_accum
            if out.aux_loss is not None:
                sums["aux_loss"] += out.aux_loss.item() / t.grad_accum
            self.tokens_seen += batch.shape[0] * par.world_size * (batch.shape[1] - 1)
        par.finish_gradients()
        grad_norm = par.clip_grad_norm_(self.model, t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if par.distributed:  # losses averaged over ranks; loads summed (the bias update sees all tokens)
            sums = dict(zip(sums, par.mean(list(sums.values()))))
        par.reduce_loads(self.model.moe_layers())
        for name, moe in self.model.moe_layers():
            self._interval_counts.setdefault(name, torch.zeros_like(moe.load_counts)).add_(moe.load_counts)
            moe.update_bias(self.model.config.aux_free_bias_update_rate)
        self.step += 1
        rec = {"loss": sums["loss"], "lr": lr, "grad_norm": float(grad_norm)}
        if self.model.mtp:
            rec["mtp_loss"] = sums["mtp_loss"]
        if sums["aux_loss"]:
            rec["aux_loss"] = sums["aux_loss"]
        rec.update(extra)  # a subclass's own loss terms (this rank's values)
        return rec

    # The training-loss hook (compress/distill.py overrides it; the loop stays this one).
    needs_hidden = False  # True: the forward passes `return_hidden=True`, so `loss` sees out.hidden_states [B,T,D]

    def loss(self, batch_BT: torch.Tensor, out) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backpropagate for one micro-batch (batch_BT: token ids [B,T], `out`: the model's
        CausalLMOutput with labels=batch) and extra terms to log, averaged over micro-batches. Default: the
        model's own loss (next-token CE + MTP + balance terms), nothing extra."""
        return out.loss, {}

    def _load_record(self) -> dict[str, Any]:
        """Expert-load statistics over the steps since the last log, per MoE layer."""
        rec: dict[str, Any] = {}
        fractions = {}
        for name, counts in self._interval_counts.items():
            short = name.replace("model.layers.", "L").replace(".mlp", "").replace("mtp.", "MTP").replace(".block", "")
            s = load_stats(counts)
            rec[f"load_max_over_mean/{short}"] = s["max_over_mean"]
            rec[f"dead_experts/{short}"] = s["dead"]
            fractions[short] = [round(f, 5) for f in s["fractions"]]
        if fractions:
            rec["load_fractions"] = fractions
        self._interval_counts = {}
        # expert parallelism: the all-to-all bytes one token moved per MoE layer since the last record
        traffic = [m.experts.traffic for _, m in self.model.moe_layers() if hasattr(m.experts, "traffic")]
        tokens = sum(t["tokens"] for t in traffic)
        if tokens:
            sent = sum(t["bytes"] for t in traffic)
            rec["a2a_bytes_per_token_layer"] = sent / tokens
            rec["a2a_remote_fraction"] = sum(t["remote_bytes"] for t in traffic) / max(1, sent)
            for t in traffic:
                t.update(tokens=0, bytes=0, remote_bytes=0)
        return rec

    def trainer_state(self) -> dict[str, Any]:
        """What a resumed run needs beyond weights and optimizer (those go through DCP): step, tokens,
        scheduler, data position, RNG, world size."""
        return {"step": self.step, "tokens": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                "data": self.loader.state_dict(), "rng": torch.get_rng_state(), "world_size": self.par.world_size}

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N (model, tokenizer, trainer state, sharded model + optimizer state),
        point `latest` at it, prune this run's older ones, then refresh OUT's model files."""
        par = self.par
        ck = self.out / CHECKPOINTS
        name = f"step-{self.step:06d}"
        sharded_tmp = ck / f".{name}.{SHARDED_STATE}.tmp"
        if par.is_main:
            ck.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(sharded_tmp, ignore_errors=True)
        par.barrier()
        # model + optimizer through torch.distributed.checkpoint (every rank writes its shards)
        par.save_state(sharded_tmp, self.model, self.optimizer)
        full = par.full_model_state(self.model)  # a collective: every rank takes part
        par.barrier()
        target = ck / name
        if par.is_main:
            model = self.model
            if full is not None:  # several processes: a plain copy of the gathered weights to write
                model = SeekForCausalLM(self.model.config)
                model.load_state_dict(full)
            files: dict[str, bytes | str] = dict(self.tokenizer.files())
            files["recipe.yaml"] = self.recipe.to_yaml()

            def write(tmp: Path) -> None:
                write_model_files(model, tmp, extra_files=files)
                (tmp / "trainer_state").mkdir(parents=True, exist_ok=True)
                os.replace(sharded_tmp, tmp / "trainer_state" / SHARDED_STATE)  # complete before the rename

            target = self.checkpoints.save(self.step, self.trainer_state(), write=write,
                                           keep=self.t.keep_checkpoints, recipe=self.recipe.to_dict())
            save_model(model, self.out, extra_files=files)
        self.checkpoints.last_saved_step = self.step
        par.barrier()
        return target

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        """Train to train.steps: log, evaluate, save; SIGINT/SIGTERM finish the step, save and raise
        TrainingInterrupted. Returns a TrainResult."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if not hasattr(self, "model"):
            self.prepare()
        t = self.t
        result = TrainResult(self.out, self.step, self.tokens_seen)
        start = time.perf_counter()
        if self.step == 0:
            v = self.evaluate()
            self.logger.log(0, {"val_loss": v, "val_ppl": math.exp(min(v, 50))})
            result.val_losses.append((0, v))
            self._report_eval(0, v)
        window_t, window_tokens = time.perf_counter(), 0
        columns = [TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        with StopSignals() as stop, Progress(*columns, console=self.console,
                                             disable=not t.progress or not self.par.is_main,
                                             transient=False) as progress:
            task = progress.add_task("train", total=t.steps, completed=self.step, loss=float("nan"), tps=0.0)
            while self.step < t.steps:
                tokens_before = self.tokens_seen
                rec = self.train_step()
                window_tokens += self.tokens_seen - tokens_before
                result.train_losses.append((self.step, rec["loss"]))
                if self.step % t.log_every == 0 or self.step == t.steps:
                    now = time.perf_counter()
                    rec["tokens_per_s"] = window_tokens / max(1e-9, now - window_t)
                    rec["tokens"] = self.tokens_seen
                    window_t, window_tokens = now, 0
                    rec.update(self._load_record())
                    self.logger.log(self.step, rec)
                    progress.update(task, loss=rec["loss"], tps=rec["tokens_per_s"])
                if self.on_step:
                    self.on_step(self)
                progress.update(task, completed=self.step, total=t.steps)
                out_of_time = t.max_minutes is not None and time.perf_counter() - start > 60 * t.max_minutes
                if t.max_minutes is not None:  # rank 0's clock decides for every rank (no diverging loops)
                    out_of_time = self.par.broadcast_object(out_of_time)
                last = self.step == t.steps or out_of_time
                if (t.eval_every and self.step % t.eval_every == 0) or last:
                    v = self.evaluate()
                    self.logger.log(self.step, {"val_loss": v, "val_ppl": math.exp(min(v, 50))})
                    result.val_losses.append((self.step, v))
                    self._report_eval(self.step, v, progress.console)
                if (t.save_every and self.step % t.save_every == 0) or last:
                    self.save_checkpoint()
                if out_of_time:
                    result.stopped_early = self.step < t.steps
                    break
                # SIGINT/SIGTERM: save and stop (rank 0's signal decides for every rank)
                signum = self.par.broadcast_object(stop.received) if self.par.distributed else stop.received
                if signum is not None:
                    self.logger.close()
                    saved = self.save_checkpoint() if self.checkpoints.last_saved_step != self.step else None
                    raise TrainingInterrupted(signum, saved or latest_checkpoint(self.out))
        self.logger.close()
        if self.par.is_main:
            plot_training(self.out)
        result.steps, result.tokens = self.step, self.tokens_seen
        result.seconds = time.perf_counter() - start
        return result

    def _report_eval(self, step: int, v: float, console=None) -> None:
        (console or self.console).print(f"step {step:>6}  validation loss {v:.4f}  (perplexity {math.exp(min(v, 50)):.1f})")
        if self.on_eval:
            self.on_eval(step, v)


class NullLogger:
    """The metrics logger of ranks other than 0 (only rank 0 writes logs)."""

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""


def update_config(target: SeekConfig, source: SeekConfig, names) -> None:
    """Copy the fields `names` from `source` into `target` in place (modules keep a reference to `target`)."""
    for name in names:
        setattr(target, name, getattr(source, name))
