"""Shapes VQA exact match per question type, beside the question-only ceiling (majority answer per question).

    python benchmarks/vision/per_type.py MODEL_DIR DATA/shapes [--split test] [--max-examples N]

Loads the fine-tuned model once, generates the answers of the split's questions (the same greedy decoding and
normalized exact match as `seekformer eval`) and prints one JSON line per question type and one for all:
{"type", "examples", "exact_match", "question_only"}. The question-only figure answers each question with the
answer most frequent for that exact question in train.jsonl (the best a model that ignores the image can do).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

TYPES = (("colour", "what color"), ("shape", "what shape"), ("exists", "is there"), ("count", "how many"),
         ("leftright", "is the"))


def question_type(question: str) -> str:
    return next((name for name, prefix in TYPES if question.startswith(prefix)), "other")


def main(argv: list[str] | None = None) -> None:
    import torch

    from seekformer.data.tasks import Encoder, TaskRecipe, load_split
    from seekformer.evaluation.metrics import normalize_answer, predict_task
    from seekformer.models.loading import load_multitask
    from seekformer.tokenizer import SeekTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("data", help="folder with train.jsonl and the split's jsonl (python -m seekformer.data.shapes)")
    p.add_argument("--split", default="test")
    p.add_argument("--task", default="shapes")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    data = Path(a.data)
    model = load_multitask(a.model)
    tok = SeekTokenizer.load(a.model)
    decl = model.tasks[a.task]
    spec = TaskRecipe(**{k: v for k, v in decl.items() if k in TaskRecipe.__dataclass_fields__})
    records = load_split(spec, str(data / f"{a.split}.jsonl"), a.split, a.max_examples)
    examples = Encoder(spec, tok, None, image=model.image_spec).encode(records, a.split, training=False)
    preds = predict_task(model, tok, decl, examples)

    majority: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        majority[r["question"]][r["answer"]] += 1
    rows: dict[str, list[tuple[bool, bool]]] = collections.defaultdict(list)
    for rec, pred in zip(records, preds):
        gold = normalize_answer(rec["answer"])
        prior = majority[rec["question"]].most_common(1)[0][0] if majority[rec["question"]] else ""
        hit = (normalize_answer(pred) == gold, normalize_answer(prior) == gold)
        rows[question_type(rec["question"])].append(hit)
        rows["all"].append(hit)
    for name in [t for t, _ in TYPES if t in rows] + ["all"]:
        hits = rows[name]
        print(json.dumps({"type": name, "examples": len(hits),
                          "exact_match": round(sum(h for h, _ in hits) / len(hits), 4),
                          "question_only": round(sum(q for _, q in hits) / len(hits), 4)}))


if __name__ == "__main__":
    main()
