"""`seekformer eval` (perplexity, MMLU-style multiple choice, fine-tuned tasks) and `seekformer lm-eval`.

    seekformer eval MODEL_DIR --perplexity builtin|FILE [--window N --stride M]
    seekformer eval MODEL_DIR --mmlu DIR|FILE|hf:cais/mmlu [--subjects a,b] [--shots 5]
    seekformer eval MODEL_DIR --task NAME|RECIPE [--data FILE] [--json]   (heads of `seekformer finetune`)
    seekformer lm-eval --model seekformer --model_args pretrained=DIR --tasks ...   (lm-eval's own CLI)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from . import options as opts
from ..errors import DataError, SeekformerError, TaskError


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _subjects(values: list[str] | None) -> list[str] | None:
    out = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    return out or None


def run_perplexity(model, tok, source: str, window: int | None, stride: int | None, max_tokens: int | None,
                   batch_size: int | None, quiet: bool) -> dict:
    from ..evaluation.perplexity import evaluate_perplexity, perplexity_documents

    console = _console()
    with console.status("scoring...", spinner="dots") if not quiet else _null():
        res = evaluate_perplexity(model, tok, perplexity_documents(source), window=window, stride=stride,
                                  max_tokens=max_tokens, batch_size=batch_size)
    return {"source": source, **res.to_dict()}


def run_mmlu(model, tok, source: str, subjects: list[str] | None, shots: int, split: str,
             batch_size: int | None, quiet: bool = False) -> dict:
    from ..evaluation.multiple_choice import evaluate_multiple_choice, read_questions

    questions = read_questions(source, split, subjects)
    dev = read_questions(source, "dev", subjects) if shots > 0 else []
    if quiet:
        res = evaluate_multiple_choice(model, tok, questions, shots=shots, dev=dev, batch_size=batch_size)
    else:
        from rich.progress import Progress

        with Progress(console=_console(), transient=True) as bar:
            job = bar.add_task(f"{len(questions)} questions", total=len(questions))
            res = evaluate_multiple_choice(model, tok, questions, shots=shots, dev=dev, batch_size=batch_size,
                                           progress=lambda n: bar.update(job, completed=n))
    return {"source": source, "split": split, **res.to_dict()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "perplexity" in results:
        r = results["perplexity"]
        t = Table(title=f"perplexity on {r['source']} (window {r['window']}, stride {r['stride']})")
        for col in ("documents", "tokens", "bytes", "nll/token", "perplexity", "bits/byte"):
            t.add_column(col, justify="right")
        t.add_row(str(r["documents"]), str(r["tokens"]), str(r["bytes"]), f"{r['nll_per_token']:.4f}",
                  f"{r['perplexity']:.3f}", f"{r['bits_per_byte']:.4f}")
        console.print(t)
    if "mmlu" in results:
        r = results["mmlu"]
        t = Table(title=f"multiple choice: {r['source']} ({r['split']}, {r['shots']}-shot)")
        for col, just in (("subject", "left"), ("correct", "right"), ("total", "right"), ("accuracy", "right")):
            t.add_column(col, justify=just)
        for name, s in r["subjects"].items():
            t.add_row(name, str(s["correct"]), str(s["total"]), f"{s['accuracy']:.4f}")
        t.add_row("[bold]macro average[/]", "", str(r["questions"]), f"[bold]{r['macro_accuracy']:.4f}[/]")
        t.add_row("micro average", "", "", f"{r['micro_accuracy']:.4f}")
        console.print(t)


def _eval_tasks(model, model_dir, task: str | None, data: str | None, recipe: str | None) -> list[tuple[dict, str]]:
    """[(task declaration, data source)] to evaluate: one named task, or every task of a recipe."""
    from ..data.tasks import resolve_splits

    decls = model.tasks
    if task and (task.endswith((".yaml", ".yml")) or Path(task).is_file()):
        recipe, task = task, None
    if recipe:
        from ..training.multitask_recipe import load_finetune_recipe

        r = load_finetune_recipe(recipe, [f"--base={model_dir}"])
        wanted = [t for t in r.tasks if task is None or t.name == task]
        out = []
        for t in wanted:
            if t.name not in decls:
                raise TaskError(f"the model has no head for task {t.name!r} of the recipe (it has: "
                                f"{', '.join(decls)})")
            splits = resolve_splits(t)
            src = data or splits.get("test") or splits.get("validation")
            if not src:
                raise DataError(f"task {t.name!r} of the recipe has no test or validation data; pass --data")
            out.append((decls[t.name], src))
        return out
    if not task:
        if len(decls) != 1:
            raise TaskError(f"name the task to evaluate with --task (the model has: {', '.join(decls)})")
        task = next(iter(decls))
    if task not in decls:
        raise TaskError(f"the model has no task {task!r} (it has: {', '.join(decls)}); pass --task NAME or a recipe")
    d = decls[task]
    src = data or d.get("test") or d.get("validation")
    if not src:
        raise DataError(f"task {task!r} records no test data; pass --data FILE")
    return [(d, src)]


def evaluate_task_cli(model_dir: str | Path, task: str | None = None, data: str | None = None,
                      json_out: bool = False, recipe: str | None = None, output: str | Path | None = None,
                      batch_size: int = 32, max_examples: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Evaluate fine-tuned task head(s) of MODEL_DIR and print a table (or JSON with `json_out`).

    `task` is a task name of the model or a fine-tuning recipe (all its tasks); `data` a file/source that
    overrides the recorded test split. Returns {metric: value} for one task, {task: {metric: value}} for
    several; `output` also writes that JSON to a file.
    """
    from ..data.tasks import Encoder, TaskRecipe, load_split
    from ..evaluation.metrics import evaluate_task
    from ..models.loading import load_multitask
    from ..tokenizer import SeekTokenizer

    model = load_multitask(model_dir, device=device)
    tokenizer = SeekTokenizer.load(model_dir)
    results: dict[str, dict[str, float]] = {}
    for decl, src in _eval_tasks(model, model_dir, task, data, recipe):
        fields = {k: v for k, v in decl.items() if k in TaskRecipe.__dataclass_fields__}
        spec = TaskRecipe(**fields)
        records = load_split(spec, src, "test", max_examples)
        examples = Encoder(spec, tokenizer, decl.get("labels"), image=getattr(model, "image_spec", None)
                           ).encode(records, src, training=False)
        results[decl["name"]] = evaluate_task(model, tokenizer, decl, examples, batch_size)
    payload: dict[str, Any] = next(iter(results.values())) if len(results) == 1 else results
    if output:
        Path(output).write_text(json.dumps(payload, indent=2) + "\n")
    if json_out:
        typer.echo(json.dumps(payload))
    else:
        print_task_table(results)
    return payload


def print_task_table(results: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="task metrics")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, metrics in results.items():
        for k, v in metrics.items():
            table.add_row(name, k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model_dir: Path = typer.Argument(..., help="A model directory (config.json, weights, tokenizer)."),
        perplexity: Optional[str] = typer.Option(
            None, "--perplexity", help="Text to score: 'builtin' (the quickstart validation documents), a "
            ".txt/.gz/.jsonl file, a folder or hf:NAME."),
        window: Optional[int] = typer.Option(None, "--window", min=2, help="Tokens per window (default: context)."),
        stride: Optional[int] = typer.Option(None, "--stride", min=1,
                                             help="Tokens between windows (default: window/2)."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1,
                                                 help="Stop after about this many tokens."),
        mmlu: Optional[str] = typer.Option(None, "--mmlu", help="MMLU-format questions: a folder, CSV/JSONL file "
                                           "or hf:cais/mmlu."),
        subjects: Optional[list[str]] = typer.Option(None, "--subjects", help="Subjects to test (comma-separated "
                                                     "or repeated; default: all)."),
        shots: int = typer.Option(0, "--shots", min=0, help="Solved examples per prompt (from the dev split)."),
        split: str = typer.Option("test", "--split", help="Split of the multiple-choice data to score."),
        task: Optional[str] = typer.Option(None, "--task", help="A fine-tuned task of the model (or a recipe)."),
        data: Optional[str] = typer.Option(None, "--data", help="Test data for --task (overrides the recorded one)."),
        json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
        output: Optional[Path] = typer.Option(None, "--output", help="Also write the results JSON to this file."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Sequences per forward."),
        max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="Limit for --task."),
        device: opts.Device = "cpu",
        dtype: opts.Dtype = None,
    ) -> None:
        """Measure a model: perplexity and bits per byte, multiple-choice accuracy, or a fine-tuned task."""
        if not (perplexity or mmlu or task):
            raise SeekformerError("nothing to evaluate: pass --perplexity SOURCE, --mmlu SOURCE or --task NAME")
        if task:
            if perplexity or mmlu:
                raise SeekformerError("--task evaluates a fine-tuned head: run it separately from --perplexity/--mmlu")
            evaluate_task_cli(model_dir, task, data, json_out, output=output, batch_size=batch_size or 32,
                              max_examples=max_examples, device=device)
            return
        from ..models.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_dir, device, dtype)
        results: dict = {}
        if perplexity:
            results["perplexity"] = run_perplexity(model, tok, perplexity, window, stride, max_tokens, batch_size,
                                                   json_out)
        if mmlu:
            results["mmlu"] = run_mmlu(model, tok, mmlu, _subjects(subjects), shots, split, batch_size, json_out)
        if output:
            output.write_text(json.dumps(results, indent=2) + "\n")
        if json_out:
            typer.echo(json.dumps(results))
        else:
            _print_tables(results)

    @app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False)
    def lm_eval_cmd(ctx: typer.Context) -> None:
        """lm-evaluation-harness with the `seekformer` model registered: all arguments go to lm-eval
        (e.g. --model seekformer --model_args pretrained=DIR --tasks hellaswag --include_path DIR)."""
        try:
            from ..evaluation.lm_eval_adapter import main
        except ImportError as e:
            if "lm_eval" not in str(e):
                raise
            raise SeekformerError("lm-eval is not installed: pip install 'seekformer[eval]'") from None
        main(list(ctx.args))
