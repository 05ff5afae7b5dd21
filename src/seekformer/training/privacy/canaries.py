"""Canary audit (Carlini et al. 2019, "The Secret Sharer"): does a fine-tune memorize secrets in its data?

`audit_canaries(recipe)` inserts `canaries` secret records into the training split of the recipe's
generation task, each `repeats` times: source "my secret code is", target a random digit string of
`secret_length` digits (space-separated, so each digit is a token). It fine-tunes as the recipe says
(DP-SGD when it has a `privacy:` section), then ranks each canary's secret among `candidates` random
secrets of the same format by the model's log-perplexity of the target given the source:

    exposure = log2(|R|) - log2(rank)  estimated as  -log2(rank / (candidates + 1))

(|R| = 10^secret_length possible secrets; rank 1 = the model prefers the true secret to every candidate,
exposure log2(candidates + 1), the most this many candidates can show). A model that did not see the
secret gives rank ~ (candidates + 1) / 2, exposure ~ 1 bit. The run writes OUT/canaries.json.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import atomic_write_text
from ...errors import RecipeError

CANARY_FILE = "canaries.json"
PREFIX = "my secret code is"


def secret(rng: random.Random, length: int) -> str:
    """A random secret of `length` space-separated digits (a canary's payload)."""
    return " ".join(str(rng.randrange(10)) for _ in range(length))


def audit_canaries(recipe, canaries: int = 4, repeats: int = 8, secret_length: int = 6, candidates: int = 500,
                   console=None) -> dict[str, Any]:
    """Insert canaries, fine-tune, measure exposure; returns (and writes to OUT/canaries.json) the report."""
    from ...data.tasks import load_split, resolve_splits
    from ..multitask import MultiTaskTrainer

    if len(recipe.tasks) != 1 or recipe.tasks[0].type != "generation":
        raise RecipeError("audit canaries needs a recipe with one generation task (the canaries are "
                          "source -> target records, scored by the language-model head)")
    if canaries < 1 or repeats < 1 or secret_length < 1 or candidates < 1:
        raise RecipeError("audit canaries: --canaries, --repeats, --secret-length and --candidates must be >= 1")
    r = copy.deepcopy(recipe)
    task = r.tasks[0]
    rng = random.Random(r.train.seed + 4242)
    secrets = [secret(rng, secret_length) for _ in range(canaries)]
    splits = resolve_splits(task)
    records = load_split(task, splits["train"], "train", task.max_train_examples, r.train.seed)
    src, tgt = task.field_name("source"), task.field_name("target")
    records = [{src: rec[src], tgt: rec[tgt]} for rec in records]
    records += [{src: PREFIX, tgt: s} for s in secrets for _ in range(repeats)]
    random.Random(r.train.seed).shuffle(records)
    out = Path(r.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "canary_train.jsonl"
    atomic_write_text(data, "".join(json.dumps(x) + "\n" for x in records))
    task.train, task.max_train_examples = str(data), None
    task.validation = splits.get("validation") if task.validation is None and "validation" in splits else task.validation
    task.test = splits.get("test") if task.test is None and "test" in splits else task.test
    if r.privacy is not None:
        from .dp_sgd import PrivateTrainer as cls
    else:
        cls = MultiTaskTrainer
    trainer = cls(r, console=console)
    trainer.prepare()
    trainer.run()
    gen = random.Random(r.train.seed + 99)
    pool = [secret(gen, secret_length) for _ in range(candidates)]
    rows = []
    for s in secrets:
        others = [c for c in pool if c != s]
        nll = sequence_nll(trainer, task.name, [s] + others)
        rank = 1 + sum(1 for x in nll[1:] if x <= nll[0])
        rows.append({"secret": s, "repeats": repeats, "rank": rank, "candidates": len(others),
                     "exposure": math.log2((len(others) + 1) / rank), "nll": nll[0],
                     "candidate_nll_median": sorted(nll[1:])[len(others) // 2]})
    report = {"canaries": rows, "mean_exposure": sum(x["exposure"] for x in rows) / len(rows),
              "max_measurable_exposure": math.log2(candidates + 1), "secret_space_bits": secret_length * math.log2(10),
              "private": r.privacy is not None}
    if r.privacy is not None:
        report["privacy"] = trainer.privacy_report()
    atomic_write_text(out / CANARY_FILE, json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def sequence_nll(trainer, task: str, targets: list[str], batch_size: int = 64) -> list[float]:
    """Summed negative log-likelihood of each target after the canary prefix, under the trained model."""
    from ...data.tasks import Encoder, TaskRecipe, collate

    model = trainer.model
    model.eval()
    decl = trainer.data[task].decl
    enc = Encoder(TaskRecipe(**{k: decl[k] for k in TaskRecipe.__dataclass_fields__ if k in decl}),
                  trainer.tokenizer, None)
    src, tgt = enc.task.field_name("source"), enc.task.field_name("target")
    ex = enc.encode([{src: PREFIX, tgt: t} for t in targets], "canaries", training=True)
    out = []
    for i in range(0, len(ex), batch_size):
        batch = collate(ex[i: i + batch_size], "generation", trainer.tokenizer.pad_token_id)
        batch = {k: v.to(trainer.t.device) for k, v in batch.items()}
        logits = model(task, batch["input_ids"], batch["attention_mask"]).logits.float()  # [B,T,V]
        labels = batch["labels"]
        target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out.extend((-(logp * (target != -100))).sum(1).tolist())
    model.train()
    return out


__all__ = ["audit_canaries", "sequence_nll", "CANARY_FILE"]
