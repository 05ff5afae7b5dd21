"""`seekformer finetune RECIPE` and task evaluation (`evaluate_task_cli`, behind `seekformer eval --task`).

`cli/evaluate.py` owns the `eval` command when it defines one (perplexity, knowledge tests) and delegates
`seekformer eval MODEL_DIR --task NAME|RECIPE` here; until then this module registers `eval` itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import DataError, TaskError


def _console():
    from rich.console import Console

    return Console(stderr=True)


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
    from ..models.multitask import SeekForMultiTask
    from ..tokenizer import SeekTokenizer

    model = SeekForMultiTask.from_pretrained(model_dir, device=device)
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
        print_table(results)
    return payload


def print_table(results: dict[str, dict[str, float]]) -> None:
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


def _evaluate_module_defines_eval() -> bool:
    """True when cli/evaluate.py registers an `eval` command (then it owns `eval` and delegates --task here)."""
    spec = importlib.util.find_spec(f"{__package__}.evaluate")
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return False
    return re.search(r"""command\(\s*["']eval["']""", Path(spec.origin).read_text(encoding="utf-8")) is not None


def register(app: typer.Typer) -> None:
    @app.command("finetune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def finetune_cmd(
        ctx: typer.Context,
        recipe: str = typer.Argument(..., help="A fine-tuning recipe YAML file or a builtin one (finetune_builtin)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT/checkpoints "
                                    "(written every train.save_every steps)."),
    ) -> None:
        """Fine-tune a pretrained model on one or more tasks (shared trunk, one head per task).

        Override any key with --section.key value (e.g. --train.steps 50 --weighting.strategy dwa),
        --base DIR / --out DIR, or --tasks.NAME.key value.
        """
        from ..training.multitask import finetune
        from ..training.multitask_recipe import load_finetune_recipe

        r = load_finetune_recipe(recipe, list(ctx.args))
        if resume:
            r.train.resume = True
        console = _console()
        result = finetune(r, console=console)
        console.print(f"done: {result.steps} steps in {result.seconds / 60:.1f} min; model in {result.out_dir} "
                      f"(metrics: {result.out_dir}/results.json, plot: {result.out_dir}/finetune.png)")

    if _evaluate_module_defines_eval():
        return

    @app.command("eval")
    def eval_cmd(
        model_dir: Path = typer.Argument(..., help="A fine-tuned model directory (from seekformer finetune)."),
        task: Optional[str] = typer.Option(None, "--task", help="Task name of the model, or a fine-tuning recipe."),
        data: Optional[str] = typer.Option(None, "--data", help="Test data (file, builtin:NAME:SPLIT, hf:...)."),
        json_out: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
        output: Optional[Path] = typer.Option(None, "--output", help="Also write the metrics JSON to this file."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1),
    ) -> None:
        """Evaluate a fine-tuned task: accuracy/F1, token accuracy/entity F1, BLEU/chrF or QA EM/F1."""
        evaluate_task_cli(model_dir, task, data, json_out, output=output, batch_size=batch_size,
                          max_examples=max_examples)
