"""`seekformer quickstart`, `seekformer pretrain`, `seekformer tokenizer train`."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import RecipeError
from . import options as opts

QUICKSTART_PROMPTS = ("The United States", "Call me Ishmael. Some years ago", "To be, or not to be")

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train or inspect tokenizers.")


def _console():
    from rich.console import Console

    return Console()  # progress on stdout; stderr carries only errors


def measure_step_seconds(trainer, repeats: int = 4) -> float:
    """Median seconds of one training step (forward, backward, AdamW), on a copy: the run is untouched."""
    import torch

    from ..training.optim import build_optimizer

    t = trainer.t
    model = copy.deepcopy(trainer.model).train()
    opt = build_optimizer(model, t.lr, t.weight_decay)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (t.batch_size, t.seq_len + 1), generator=g)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(t.grad_accum):
            with trainer.autocast():
                model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    for _, moe in model.moe_layers():
        moe.load_counts.zero_()
    return statistics.median(times[1:])


def plan_time_budget(trainer, seconds: float, step_s: float, evals: int, steps_done: int = 0) -> None:
    """Size train.steps (eval/save cadence and the cosine schedule too) so training fits in `seconds` more."""
    from ..training.optim import lr_lambda

    t = trainer.t
    eval_s = trainer.eval_seconds or step_s / 3 * t.eval_batches
    steps = steps_done + int(max(0.0, seconds - evals * eval_s) / step_s)
    t.steps = max(steps_done + 10, 40, min(steps, 50000))
    t.eval_every = max(10, t.steps // evals)
    t.save_every = max(10, t.steps // 3)
    f = lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio)
    trainer.scheduler.lr_lambdas = [f] * len(trainer.optimizer.param_groups)


def _replanner(budget: float, evals: int):
    """At the end of warmup, re-size the run from its measured speed (the warmup schedule is unaffected)."""
    start = time.perf_counter()

    def on_step(trainer) -> None:
        if trainer.step != trainer.t.warmup_steps:
            return
        elapsed = time.perf_counter() - start
        step_s = max(1e-6, (elapsed - trainer.eval_seconds) / trainer.step)
        plan_time_budget(trainer, budget - elapsed, step_s, evals - 1, steps_done=trainer.step)

    return on_step


def print_samples(model, tokenizer, prompts, console, max_new_tokens: int = 48, seed: int = 0) -> list[str]:
    """Sample a continuation of each prompt (temperature 0.8, top-p 0.95) and print it."""
    import torch

    texts = []
    model.eval()
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                             seed=seed + i, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:].tolist())
        texts.append(text)
        console.print(f"[bold cyan]{prompt}[/]{text}")
    return texts


def register(app: typer.Typer) -> None:
    from ..training.recipe_docs import keys_summary  # dataclasses only: no torch at start-up

    @app.command("quickstart", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def quickstart(
        ctx: typer.Context,
        minutes: float = typer.Option(8.0, help="Time budget for training (setup and samples come on top)."),
        out: Path = typer.Option(Path("seekformer-quickstart"), help="Output (model) directory."),
        seed: int = typer.Option(0, help="Seed for data order, initialisation and sampling."),
        threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's choice)."),
    ) -> None:
        """Train a tokenizer and a tiny MoE model on the embedded corpus, then print samples.

        Extra `--section.key value` pairs override the builtin `quickstart` recipe (e.g. --model.num_hidden_layers 6).
        """
        from ..training.recipe import load_recipe
        from ..training.trainer import Trainer

        if minutes <= 0:
            raise RecipeError(f"--minutes must be > 0, got {minutes}")
        console = _console()
        t_start = time.perf_counter()
        recipe = load_recipe("quickstart", [f"--train.out={out}", f"--train.seed={seed}"]
                           + ([f"--train.threads={threads}"] if threads else []) + list(ctx.args))
        trainer = Trainer(recipe, console=console)
        trainer.prepare()
        step_s = measure_step_seconds(trainer)
        t = trainer.t
        budget = max(30.0, minutes * 60 - (time.perf_counter() - t_start))
        t.warmup_steps = min(t.warmup_steps, max(1, int(budget / step_s) // 10))
        plan_time_budget(trainer, budget, step_s, evals=8)
        t.max_minutes = budget / 60
        trainer.on_step = _replanner(budget, evals=8)
        cfg = trainer.config
        console.print(f"model: {cfg.num_parameters() / 1e6:.1f}M parameters ({cfg.num_parameters(active=True) / 1e6:.1f}M "
                      f"active), {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed + "
                      f"{cfg.n_shared_experts} shared experts, top-{cfg.num_experts_per_tok}, "
                      f"{cfg.num_nextn_predict_layers} MTP module(s)")
        console.print(f"training ~{t.steps} steps of {t.batch_size}x{t.seq_len} tokens "
                      f"(~{step_s:.2f} s/step, budget {budget / 60:.1f} min; re-planned after warmup)")
        result = trainer.run()
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        console.print(f"\nvalidation loss {first:.3f} -> {last:.3f} after {result.steps} steps, "
                      f"{result.tokens / 1e6:.2f}M tokens, {result.seconds / 60:.1f} min")
        console.print("\n[bold]samples[/] (temperature 0.8, top-p 0.95):")
        print_samples(trainer.model, trainer.tokenizer, QUICKSTART_PROMPTS, console, seed=seed)
        console.print(f"\nmodel directory: {out}  (plot: {out}/training.png, metrics: {out}/metrics.jsonl)")
        console.print(f"next: seekformer generate {out} --prompt 'Once upon a time'   |   seekformer serve {out}")

    @app.command("pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 epilog=keys_summary())
    def pretrain_cmd(
        ctx: typer.Context,
        recipe: str = typer.Argument(..., help="A recipe YAML file or a builtin recipe name (quickstart, tiny, small)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in train.out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a train.out that holds an earlier "
                                       "run's checkpoints (they are deleted)."),
        nproc: opts.Nproc = 1,
        nnodes: opts.Nnodes = 1,
        node_rank: opts.NodeRank = 0,
        rdzv_endpoint: opts.RdzvEndpoint = None,
    ) -> None:
        """Pretrain a model as RECIPE describes; override any key with --section.key value."""
        from ..distributed.launch import relaunch, wants_launch
        from ..training.recipe import load_recipe
        from ..training.pretrain import pretrain

        r = load_recipe(recipe, list(ctx.args))
        r.train.resume = r.train.resume or resume
        r.train.overwrite = r.train.overwrite or overwrite
        if wants_launch(nproc, nnodes):
            from ..distributed import check_parallel

            def check(world: int) -> None:
                check_parallel(r.parallel, world, r.train.batch_size, r.model_config().n_routed_experts)

            argv = ["pretrain", recipe, *ctx.args] + (["--resume"] if resume else []) \
                + (["--overwrite"] if overwrite else [])
            relaunch(argv, nproc, nnodes, node_rank, rdzv_endpoint, check)
        console = _console()
        result = pretrain(r, console=console)
        v = result.val_losses
        console.print(f"done: {result.steps} steps, validation loss {v[0][1]:.3f} -> {v[-1][1]:.3f}; "
                      f"model in {result.out_dir}")

    @app.command("recipe-docs")
    def recipe_docs_cmd(
        out: Optional[Path] = typer.Option(None, "--out", help="Write the reference here (e.g. docs/recipes.md) "
                                           "instead of printing it."),
    ) -> None:
        """Print the recipe reference: every section and key of pretraining and fine-tuning recipes, with
        type, default and meaning (generated from the recipe dataclasses)."""
        from ..fsio import atomic_write_text
        from ..training.recipe_docs import recipe_reference

        text = recipe_reference()
        if out is None:
            typer.echo(text, nl=False)
        else:
            atomic_write_text(out, text)
            typer.echo(f"written to {out}", err=True)

    @tokenizer_app.command("train")
    def tokenizer_train(
        files: list[str] = typer.Argument(..., help="Text files, folders, .jsonl files or 'builtin'."),
        vocab_size: int = typer.Option(4096, "--vocab-size", help="Vocabulary size (incl. 256 bytes and specials)."),
        out: Path = typer.Option(..., "--out", help="Directory for tokenizer.json and tokenizer_config.json."),
    ) -> None:
        """Train a byte-level BPE tokenizer with the `tokenizers` library."""
        from ..tokenizer import train_tokenizer_cli

        tok = train_tokenizer_cli(files, vocab_size, str(out))
        typer.echo(f"tokenizer with {tok.vocab_size} tokens written to {out}")

    app.add_typer(tokenizer_app, name="tokenizer")
