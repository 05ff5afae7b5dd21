"""The model card (`README.md` with Hugging Face YAML metadata) written with every saved model.

    text = model_card(config, recipe_text=..., metrics=read_last_metrics(out_dir))

Metadata: `library_name`, `license`, `base_model` (a fine-tune's base), `datasets` (the recipe's data
sources and task files), `metrics` (names of the metrics measured), `pipeline_tag`, `tags`. The body
states the architecture and the last measured values. Everything comes from what the run knows: the
resolved recipe saved beside the model and OUT/metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
BUILTIN_DATA = "builtin"


def _sources(recipe: dict) -> list[str]:
    """Data sources named by a pretraining recipe (data.sources) or a fine-tuning recipe (tasks[].*)."""
    out: list[str] = []
    data = recipe.get("data") or {}
    for s in data.get("sources") or []:
        out.append(str(s))
    for task in recipe.get("tasks") or []:
        if isinstance(task, dict):
            for key in ("path", "train", "source", "dataset"):
                if isinstance(task.get(key), str):
                    out.append(task[key])
    names = []
    for s in out:
        name = s[3:] if s.startswith("hf:") else (BUILTIN_DATA if s.startswith(BUILTIN_DATA) else Path(s).name)
        if name and name not in names:
            names.append(name)
    return names


def read_last_metrics(directory: str | os.PathLike) -> dict[str, float]:
    """The last value of each validation / test / evaluation metric in DIRECTORY/metrics.jsonl ({} if none)."""
    path = Path(directory) / "metrics.jsonl"
    found: dict[str, float] = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        for k, v in rec.items():
            if (k.startswith(("val", "test", "eval")) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v)):
                found[k] = float(v)
    return found


def flatten_metrics(results: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a nested results dict (e.g. a fine-tune's results.json) as {"a/b/c": value}."""
    out: dict[str, float] = {}
    if isinstance(results, dict):
        for k, v in results.items():
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
    elif isinstance(results, (int, float)) and not isinstance(results, bool) and math.isfinite(results):
        out[prefix.rstrip("/")] = float(results)
    return out


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v, ensure_ascii=False)}" for v in values] if values else []


def model_card(config, recipe_text: str | None = None, metrics: dict[str, float] | None = None,
               license: str | None = None) -> str:
    """README.md text for a model directory (see the module docstring)."""
    import yaml

    recipe: dict[str, Any] = {}
    if recipe_text:
        try:
            loaded = yaml.safe_load(recipe_text)
            recipe = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            recipe = {}
    base = recipe.get("base") or None
    datasets = _sources(recipe)
    metrics = dict(metrics or {})
    if license is None:  # seekformer's licence when trained only on the builtin (public-domain) data
        license = "apache-2.0" if datasets and all(d == BUILTIN_DATA for d in datasets) and not base else "other"
    metric_names = sorted({k.split("/")[-1].removeprefix("val_").removeprefix("test_").removeprefix("eval_")
                           for k in metrics})
    head = ["---", "library_name: transformers", f"license: {license}"]
    if base:
        head.append(f"base_model: {json.dumps(str(base), ensure_ascii=False)}")
    head += _yaml_list("datasets", datasets) + _yaml_list("metrics", metric_names)
    head += ["pipeline_tag: text-generation", "tags:", "- seekformer", f"- {config.model_type}", "- moe", "---", ""]
    c = config
    moe = (f"{c.n_routed_experts} routed experts ({c.num_experts_per_tok} per token) + {c.n_shared_experts} shared"
           if c.n_routed_experts else "dense")
    body = [
        "# Model card", "",
        f"A DeepSeek-V3-architecture model (`{c.model_type}`) trained with "
        "[seekformer](https://pypi.org/project/seekformer/); it loads in `transformers` "
        "(`AutoModelForCausalLM.from_pretrained`).", "",
        f"- layers: {c.num_hidden_layers}, hidden size {c.hidden_size}, vocabulary {c.vocab_size}, context "
        f"{c.max_position_embeddings}",
        f"- attention: multi-head latent attention (kv_lora_rank {c.kv_lora_rank}), MoE: {moe}",
    ]
    if base:
        body.append(f"- fine-tuned from: `{base}`")
    if datasets:
        body.append(f"- data: {', '.join(datasets)}")
    if metrics:
        body += ["", "## Last measured values", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    if license == "other":
        body += ["", "Licence: set `license:` above to the terms of the base model and the training data."]
    return "\n".join(head + body) + "\n"
