"""Where fine-tuning task records come from: local files, builtin task sets, Hugging Face datasets.

`read_records(source, split)` reads
* ``.jsonl`` / ``.jsonl.gz`` (one object per line), ``.json`` (a list, or {"data": [...]}), ``.csv`` / ``.tsv``;
* ``builtin:NAME[:SPLIT]``: the task sets shipped in `seekformer.data.builtin` (fortunes, brown_pos, kjv_es)
  and sets derived from them here (fortunes_qa, brown_qa, brown_names);
* ``hf:NAME[:CONFIG]:SPLIT``: a hub dataset or a `save_to_disk` directory; ClassLabel ids become names.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from pathlib import Path
from typing import Any

from ..errors import DataError

SPLITS = ("train", "validation", "test")
BUILTIN_PREFIX = "builtin:"


def builtin_source(source: str) -> tuple[str, str | None]:
    parts = source[len(BUILTIN_PREFIX):].split(":")
    if len(parts) > 2 or not parts[0]:
        raise DataError(f"cannot read {source!r}: write builtin:NAME or builtin:NAME:SPLIT")
    return parts[0], parts[1] if len(parts) == 2 else None


def builtin_names() -> list[str]:
    from .builtin import TASKS

    return sorted([*TASKS, *DERIVED])


def builtin_defaults(source: str) -> dict[str, Any]:
    """Type, fields and labels of a builtin task (for recipes that only name it)."""
    from .builtin import TASKS

    name, _ = builtin_source(source)
    if name in DERIVED:
        return dict(DERIVED[name][0])
    if name not in TASKS:
        raise DataError(f"unknown builtin task {name!r}; known: {', '.join(builtin_names())}")
    meta = TASKS[name]
    return {"type": meta["type"], "labels": meta.get("labels")}


def read_records(source: str, split: str = "train") -> list[dict]:
    """Records of a local file, a builtin task split or a Hugging Face dataset split."""
    if source.startswith(BUILTIN_PREFIX):
        from .builtin import TASKS, read_task

        name, s = builtin_source(source)
        s = s or split
        if s not in SPLITS:
            raise DataError(f"{source}: unknown split {s!r}; use one of {', '.join(SPLITS)}")
        if name in DERIVED:
            return DERIVED[name][1](s)
        if name not in TASKS:
            raise DataError(f"unknown builtin task {name!r}; known: {', '.join(builtin_names())}")
        return read_task(name, s)
    if source.startswith("hf:"):
        return _read_hf(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"task data file {path} does not exist: check the path in the recipe")
    suffixes = "".join(path.suffixes[-2:]).lower()
    opener = gzip.open if suffixes.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            if ".csv" in suffixes or ".tsv" in suffixes:
                return list(csv.DictReader(fh, delimiter="\t" if ".tsv" in suffixes else ","))
            if suffixes.endswith(".json"):
                data = json.load(fh)
                data = data.get("data", data) if isinstance(data, dict) else data
                if not isinstance(data, list):
                    raise DataError(f"{path} must hold a JSON list of records (or {{'data': [...]}})")
                return data
            records = []
            for i, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {i}: not valid JSON ({e.msg}); one object per line") from None
            return records
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg})") from None


def _read_hf(source: str) -> list[dict]:
    """hf:NAME[:CONFIG]:SPLIT (a hub name, or a directory from `save_to_disk`); ClassLabel ids become names."""
    from .corpus import parse_hf_source

    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs the datasets library: pip install 'seekformer[hf]'") from None
    name, config, split = parse_hf_source(source)
    try:
        if Path(name).expanduser().is_dir():
            ds = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name} has no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad name / offline
        raise DataError(f"cannot load the Hugging Face dataset {source} ({type(e).__name__}); check the name, "
                        "split and network") from None
    names = {}
    for col, feat in ds.features.items():
        inner = getattr(feat, "feature", None)
        if getattr(feat, "names", None):
            names[col] = (False, feat.names)
        elif getattr(inner, "names", None):
            names[col] = (True, inner.names)
    rows = []
    for row in ds:
        row = dict(row)
        for col, (is_seq, lab) in names.items():
            row[col] = [lab[i] for i in row[col]] if is_seq else lab[row[col]]
        rows.append(row)
    return rows


# ====================================================================== derived builtin tasks
def _fortunes_qa(split: str) -> list[dict]:
    """Extractive QA from fortunes with an attribution: "Who said this?" -> the name after ' -- '."""
    from .builtin import read_task

    out = []
    for r in read_task("fortunes", split):
        m = re.search(r" -- ([A-Z][^,\-\"(]{1,40}?)(?:,|\s*$|\s*\()", r["text"])
        if m and m.group(1).strip():
            out.append({"context": r["text"], "question": "Who said this?",
                        "answers": {"text": [m.group(1).strip()], "answer_start": [m.start(1)]}})
    return out


def _brown_names(split: str) -> list[dict]:
    """BIO tagging from Brown: runs of proper-noun tokens (Brown tags NP*) are NAME entities."""
    from .builtin import read_task

    out = []
    for r in read_task("brown_pos", split):
        tags, prev = [], False
        for bt in r["brown_tags"]:
            is_name = bt.startswith("NP")
            tags.append(("I-NAME" if prev else "B-NAME") if is_name else "O")
            prev = is_name
        out.append({"tokens": r["tokens"], "tags": tags})
    return out


QA_TAGS = {"NOUN": "noun", "VERB": "verb", "ADJ": "adjective", "ADV": "adverb"}


def _brown_qa(split: str) -> list[dict]:
    """Extractive QA from Brown: "What is the first verb?" (noun/verb/adjective/adverb, chosen per sentence
    among those it has, seeded) -> the first word with that universal tag. The question decides the answer."""
    from .builtin import read_task

    out = []
    rng = random.Random(f"brown_qa:{split}")
    for r in read_task("brown_pos", split):
        starts, pos = [], 0
        for w in r["tokens"]:
            starts.append(pos)
            pos += len(w) + 1
        present = [t for t in QA_TAGS if t in r["tags"]]
        if not present:
            continue
        tag = rng.choice(present)
        i = r["tags"].index(tag)
        out.append({"context": " ".join(r["tokens"]), "question": f"What is the first {QA_TAGS[tag]}?",
                    "answers": {"text": [r["tokens"][i]], "answer_start": [starts[i]]}})
    return out


DERIVED: dict[str, tuple[dict[str, Any], Any]] = {
    "fortunes_qa": ({"type": "qa", "labels": None}, _fortunes_qa),
    "brown_qa": ({"type": "qa", "labels": None}, _brown_qa),
    "brown_names": ({"type": "tagging", "labels": ["O", "B-NAME", "I-NAME"]}, _brown_names),
}
