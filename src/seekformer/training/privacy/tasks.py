"""A balanced two-class text task made from the builtin fortunes set, for the privacy and federated checks.

`write_two_class_task(out_dir)` writes train.jsonl / test.jsonl (records {text, label}): the builtin
train + validation splits of two fortune categories pooled and balanced (the larger class subsampled,
seeded) for training, the builtin test split of the same categories (balanced) for testing. With the
default categories, computers vs politics: 1,166 training and 150 test examples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ...checkpoint import atomic_write_text
from ...data.builtin import read_task
from ...errors import DataError

DEFAULT_LABELS = ("computers", "politics")


def _balanced(records: list[dict], labels: tuple[str, ...], rng: random.Random) -> list[dict]:
    by = {lab: [r for r in records if r["label"] == lab] for lab in labels}
    n = min(len(v) for v in by.values())
    out = [r for lab in labels for r in rng.sample(by[lab], n)]
    rng.shuffle(out)
    return out


def write_two_class_task(out_dir: str | Path, labels: tuple[str, ...] = DEFAULT_LABELS, seed: int = 0
                         ) -> dict[str, Path]:
    """Write the balanced task into out_dir; returns {"train": path, "test": path}."""
    known = {r["label"] for r in read_task("fortunes", "test")}
    bad = [lab for lab in labels if lab not in known]
    if bad or len(set(labels)) < 2:
        raise DataError(f"labels must be two or more distinct fortunes categories ({', '.join(sorted(known))})")
    rng = random.Random(seed)
    train = _balanced(read_task("fortunes", "train") + read_task("fortunes", "validation"), labels, rng)
    test = _balanced(read_task("fortunes", "test"), labels, rng)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, recs in (("train", train), ("test", test)):
        paths[split] = out / f"{split}.jsonl"
        atomic_write_text(paths[split], "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                                for r in recs))
    return paths


__all__ = ["write_two_class_task", "DEFAULT_LABELS"]
