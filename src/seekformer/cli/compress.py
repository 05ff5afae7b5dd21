"""`seekformer compress quantize|prune|distill` and `seekformer bench compress` (see docs/compress.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

compress_app = typer.Typer(no_args_is_help=True, help="Smaller, faster models: quantize, prune experts, distill.")


@compress_app.command("quantize")
def quantize_cmd(
    model_dir: Path = typer.Argument(..., help="Float model directory (config.json, safetensors, tokenizer)."),
    bits: int = typer.Option(..., "--bits", help="8 (int8 per output channel) or 4 (int4 per group)."),
    group_size: int = typer.Option(64, "--group-size", help="int4: inputs per scale/minimum (multiple of 32)."),
    out: Path = typer.Option(..., "--out", help="Directory for the quantized model."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Quantize the token embedding (int8 rows)."),
    lm_head: bool = typer.Option(True, "--lm-head/--no-lm-head", help="Quantize the output head."),
) -> None:
    """Weight-only int8/int4 quantization; the output loads in every verb (generate, chat, eval, serve, bench)."""
    from ..compress.quantize import dir_size, quantize_dir

    path = quantize_dir(model_dir, out, bits, group_size, embeddings=embeddings, lm_head=lm_head)
    typer.echo(f"wrote {path} (int{bits}; weights {dir_size(path) / 2**20:.1f} MiB, "
               f"from {dir_size(model_dir) / 2**20:.1f} MiB)")


@compress_app.command("prune")
def prune_cmd(
    model_dir: Path = typer.Argument(..., help="Float MoE model directory (with its tokenizer)."),
    keep: str = typer.Option(..., "--keep", help="Routed experts kept per layer: a fraction in (0,1) or a count."),
    calibration: str = typer.Option("builtin", "--calibration", help="Calibration text: builtin, file, folder or hf:NAME."),
    method: str = typer.Option("routing", "--method", help="routing (saliency) or random (seeded ablation)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --method random."),
    max_tokens: int = typer.Option(20000, "--max-tokens", help="Calibration tokens read."),
    merge: bool = typer.Option(False, "--merge/--no-merge", help="Fold each dropped expert into its most similar kept one (frequency-weighted)."),
    recover_steps: int = typer.Option(0, "--recover-steps", help="Then fine-tune N steps by distillation from the unpruned model (0: off)."),
    recover_lr: float = typer.Option(3e-4, "--recover-lr", help="Peak learning rate of the recovery steps."),
    out: Path = typer.Option(..., "--out", help="Directory for the pruned model (+ prune_stats.json, expert_usage.png)."),
) -> None:
    """Drop the least salient routed experts per layer (gate weight x output norm on calibration text)."""
    from ..compress.prune import prune_dir

    path = prune_dir(model_dir, out, keep, calibration, method, seed, max_tokens, merge=merge,
                     recover_steps=recover_steps, recover_lr=recover_lr, log=typer.echo)
    typer.echo(f"wrote {path} (+ prune_stats.json, expert_usage.png)")


@compress_app.command("distill")
def distill_cmd(
    teacher_dir: Path = typer.Argument(..., help="Float teacher model directory (with its tokenizer)."),
    student: str = typer.Option(..., "--student", help="Student: a preset name, a config.json or a recipe .yaml."),
    data: list[str] = typer.Option(["builtin"], "--data", help="Training text (repeatable): builtin, file, folder, hf:NAME."),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps."),
    kd_weight: float = typer.Option(0.5, "--kd-weight", help="W in (1-W)*CE + W*T^2*KL; 0 = no teacher (the baseline)."),
    temperature: float = typer.Option(1.0, "--temperature", help="T of the softened distributions."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="Weight of the projected final hidden-state MSE (0: off)."),
    set_: list[str] = typer.Option([], "--set", help="Student config field KEY=VALUE (repeatable), e.g. num_hidden_layers=2."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: the teacher's recipe, else 256)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per step (default: the teacher's recipe, else 16)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the teacher's recipe, else 3e-3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: the teacher's recipe's)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    out: Path = typer.Option(..., "--out", help="Run directory: the student model, checkpoints/, metrics, plot."),
) -> None:
    """Train a smaller student on the teacher's softened outputs (the pretraining trainer, exact resume)."""
    from ..compress.distill import distill_dir, parse_overrides

    train = {k: v for k, v in {"seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed,
                                    "threads": threads}.items() if v is not None}
    if resume:
        train["resume"] = True
    result = distill_dir(teacher_dir, student, data, steps, out, kd_weight, temperature, hidden_weight,
                         parse_overrides(set_), train)
    last = result.val_losses[-1][1] if result.val_losses else float("nan")
    typer.echo(f"wrote {out} (student after {result.steps} steps: validation loss {last:.4f})")


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress")


def bench_compress_cmd(
    model_dir: Optional[Path] = typer.Argument(None, help="Model directory with a tokenizer (e.g. the quickstart model)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Instead: size and speed only, random-weight preset."),
    distilled: Optional[Path] = typer.Option(None, "--distilled", help="A distilled student directory to include."),
    max_tokens: int = typer.Option(4000, "--max-tokens", help="Held-out tokens scored per variant."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Greedy tokens per timed generation."),
    repeats: int = typer.Option(3, "--repeats", help="Timed rounds (round-robin over the variants)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's choice)."),
    out: Path = typer.Option(Path("benchmarks/results/compress.md"), "--out", help="Markdown table to write."),
) -> None:
    """fp32 / int8 / int4 / pruned / distilled / llama.cpp: size, decode tok/s, held-out perplexity, accuracy."""
    import torch

    from ..bench.compress import run_compress_bench, run_preset_speed
    from ..compress.common import CompressError

    if threads is not None:
        torch.set_num_threads(threads)
    if (model_dir is None) == (preset is None):
        raise CompressError("pass a MODEL_DIR or --preset NAME (one of them)")
    if preset is not None:
        run_preset_speed(preset, out, new_tokens=new_tokens, repeats=repeats, log=typer.echo)
    else:
        run_compress_bench(model_dir, out, distilled=distilled, max_tokens=max_tokens, new_tokens=new_tokens,
                           repeats=repeats, log=typer.echo)
    typer.echo(f"wrote {out}")
