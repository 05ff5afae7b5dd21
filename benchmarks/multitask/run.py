"""Multi-task experiment: joint training (each weighting strategy) vs single-task vs from scratch.

    python benchmarks/multitask/run.py [--work /tmp/seekformer-multitask] [--steps 300]

1. Pretrains a small MoE trunk on the embedded corpus (benchmarks/multitask/pretrain.yaml) unless WORK/base
   exists.
2. From that trunk, with the same budget for every task (STEPS batches of 16 examples of each task) and the
   same hyper-parameters, fine-tunes
   * jointly on all four tasks with fixed / uncertainty / GradNorm / DWA weighting, and fixed + PCGrad;
   * jointly with LoRA adapters (trunk frozen) and fixed weights;
   * each task alone (single-task fine-tuning);
   * jointly from a randomly initialised trunk of the same shape (scratch, fixed weights).
3. Scores every run on the test splits and writes results.json, results.md and results.png here.

Tasks: fortunes (classification), brown_pos (POS tagging), kjv_es (en->es translation, first 200 test
verses), brown_qa (extractive QA derived from Brown: "What is the first verb?" ...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = [
    {"name": "fortunes", "train": "builtin:fortunes", "pooling": "mean"},
    {"name": "brown_pos", "train": "builtin:brown_pos"},
    {"name": "kjv_es", "train": "builtin:kjv_es", "max_length": 160, "max_new_tokens": 80, "max_eval_examples": 200},
    {"name": "brown_qa", "train": "builtin:brown_qa"},
]
COLUMNS = [("fortunes", "accuracy"), ("fortunes", "macro_f1"), ("brown_pos", "token_accuracy"),
           ("kjv_es", "bleu"), ("kjv_es", "chrf"), ("brown_qa", "exact_match"), ("brown_qa", "f1")]
PRIMARY = {"fortunes": "accuracy", "brown_pos": "token_accuracy", "kjv_es": "chrf", "brown_qa": "f1"}


def settings(steps: int) -> list[tuple[str, dict]]:
    joint = [(f"joint {s}", {"weighting": {"strategy": s}}) for s in ("fixed", "uncertainty", "gradnorm", "dwa")]
    joint.append(("joint fixed + PCGrad", {"weighting": {"strategy": "fixed", "pcgrad": True}}))
    joint.append(("joint fixed, LoRA r=16", {"train": {"method": "lora", "lr": 3e-3}, "lora": {"r": 16, "alpha": 32}}))
    single = [(f"single {t['name']}", {"tasks": [t["name"]]}) for t in TASKS]
    scratch = [("joint fixed, from scratch", {"train": {"init": "scratch"}})]
    return joint + single + scratch


def recipe_for(base: Path, out: Path, steps: int, change: dict) -> dict:
    names = change.get("tasks")
    tasks = [dict(t) for t in TASKS if names is None or t["name"] in names]
    train = {"steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 30, "threads": 1, "progress": False,
             "validate": False, "log_every": 10, "seed": 0, **change.get("train", {})}
    return {"base": str(base), "out": str(out), "tasks": tasks, "train": train,
            "weighting": change.get("weighting", {"strategy": "fixed"}), "lora": change.get("lora", {})}


def pretrain_base(work: Path) -> Path:
    from seekformer.training.recipe import load_recipe
    from seekformer.training.pretrain import pretrain

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        pretrain(load_recipe(str(HERE / "pretrain.yaml"), [f"--train.out={base}"]))
    return base


def baselines(base: Path, work: Path) -> dict[str, dict[str, float]]:
    """Majority class / most frequent tag / copy the source / first words of the context, on the test splits."""
    from seekformer.evaluation.metrics import baseline_metrics
    from seekformer.tokenizer import SeekTokenizer
    from seekformer.training.multitask import prepare_tasks
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict

    r = finetune_recipe_from_dict(recipe_for(base, work / "unused", 1, {}))
    data = prepare_tasks(r, SeekTokenizer.load(base))
    return {n: baseline_metrics(d.decl, d.train, d.test) for n, d in data.items()}


def run_all(work: Path, steps: int) -> dict:
    from seekformer.training.multitask import finetune
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict

    base = pretrain_base(work)
    out = {"steps": steps, "batch_size": 16, "runs": {}, "baselines": baselines(base, work)}
    for name, change in settings(steps):
        run_dir = work / name.replace(" ", "_").replace(",", "").replace("+", "").replace("=", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        res = finetune(finetune_recipe_from_dict(recipe_for(base, run_dir, steps, change)))
        out["runs"][name] = {"test": res.results["test"], "seconds": time.perf_counter() - t0}
        print(f"{name}: " + ", ".join(f"{t} {PRIMARY[t]} {m[PRIMARY[t]]:.3f}" for t, m in res.results["test"].items()),
              flush=True)
        if name in ("joint uncertainty", "joint gradnorm", "joint dwa"):  # weights / losses / gradient norms
            shutil.copy(run_dir / "finetune.png", HERE / f"curves_{run_dir.name}.png")
    return out


def fmt(v: float, metric: str) -> str:
    return f"{v:.1f}" if metric in ("bleu", "chrf") else f"{100 * v:.1f}"


def write_markdown(res: dict, command: str) -> str:
    head = "| setting | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " | minutes |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    best = {}
    for t, m in COLUMNS:
        vals = [r["test"][t][m] for r in res["runs"].values() if t in r["test"]]
        best[(t, m)] = max(vals) if vals else None
    for name, r in res["runs"].items():
        cells = []
        for t, m in COLUMNS:
            if t not in r["test"]:
                cells.append("")
                continue
            v = r["test"][t][m]
            cells.append(f"**{fmt(v, m)}**" if v == best[(t, m)] else fmt(v, m))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds'] / 60:.1f} |")
    b = res["baselines"]
    lines.append("| trivial baseline | " + " | ".join(fmt(b[t][m], m) for t, m in COLUMNS) + " | |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(PRIMARY)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.6))
    for ax, t in zip(axes, tasks):
        m = PRIMARY[t]
        names = [n for n, r in res["runs"].items() if t in r["test"]]
        vals = [res["runs"][n]["test"][t][m] for n in names]
        colors = ["tab:blue" if n.startswith("joint") and "scratch" not in n and "LoRA" not in n else
                  "tab:orange" if n.startswith("single") else "tab:gray" for n in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.axvline(res["baselines"][t][m], color="red", ls="--", lw=1, label="trivial baseline")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{t}: test {m}")
        ax.legend(fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/seekformer-multitask"))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run_all(args.work, args.steps)
    res["total_minutes"] = (time.perf_counter() - t0) / 60
    command = f"python benchmarks/multitask/run.py --work {args.work} --steps {args.steps}"
    res["command"] = command
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    table = write_markdown(res, command)
    (HERE / "results.md").write_text(f"# Multi-task fine-tuning experiment\n\nCommand: `{command}` "
                                     f"({res['total_minutes']:.0f} min on this machine).\n\n{table}\n")
    plot(res, HERE / "results.png")
    print(table)


if __name__ == "__main__":
    main()
