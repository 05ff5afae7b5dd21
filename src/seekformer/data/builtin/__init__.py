"""Small, real, redistributable datasets shipped inside the package.

Everything here is pure standard library (no torch import), so it is cheap to
import from tests, CLIs and data pipelines.

* ``corpus/*.txt.gz`` -- English pretraining text (public domain / permissive).
  Each file is UTF-8 text made of documents separated by two blank lines
  (``"\\n\\n\\n"``); paragraphs inside a document are separated by one blank line.
* ``tasks/<task>/{train,validation,test}.jsonl`` -- three small supervised sets
  with fixed splits (seeded shuffle, seed 0, 80/10/10).  A split larger than
  ~1.5 MB would be stored as ``.jsonl.gz`` instead; :func:`task_files` returns
  whichever exists and :func:`read_task` reads both.

See ``SOURCES.md`` next to this file for provenance, licences and counts, and
``tools/build_builtin_data.py`` in the repository for the reproducible build.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

__all__ = [
    "BUILTIN_DIR",
    "DOC_SEPARATOR",
    "SPLITS",
    "TASKS",
    "corpus_paths",
    "read_corpus_documents",
    "read_task",
    "task_files",
]

BUILTIN_DIR = Path(__file__).resolve().parent
DOC_SEPARATOR = "\n\n\n"
SPLITS = ("train", "validation", "test")

UNIVERSAL_TAGS = ["NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X"]

TASKS: dict[str, dict] = {
    "fortunes": {
        "type": "classification",
        "text_field": "text",
        "label_field": "label",
        "labels": ["computers", "definitions", "men-women", "politics", "science", "work"],
        "description": "Classify a BSD fortune-cookie quotation into its fortune database category.",
    },
    "brown_pos": {
        "type": "tagging",
        "tokens_field": "tokens",
        "tags_field": "tags",
        "labels": list(UNIVERSAL_TAGS),
        "description": "Brown corpus sentences tagged with the 12 universal POS tags "
        "(original Brown tags kept in 'brown_tags').",
    },
    "kjv_es": {
        "type": "generation",
        "source_field": "source",
        "target_field": "target",
        "source_lang": "en",
        "target_lang": "es",
        "description": "Translate a King James Version verse (English) into Reina-Valera 1909 (Spanish).",
    },
}


def corpus_paths() -> list[Path]:
    """The gzipped pretraining corpus files, sorted by name."""
    return sorted((BUILTIN_DIR / "corpus").glob("*.txt.gz"))


def read_corpus_documents(paths: list[Path] | None = None) -> Iterator[str]:
    """Yield the non-empty documents of the corpus files (all of them by default)."""
    for path in corpus_paths() if paths is None else paths:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
        for doc in text.split(DOC_SEPARATOR):
            doc = doc.strip("\n")
            if doc:
                yield doc


def task_files(name: str) -> dict[str, Path]:
    """``{"train": path, "validation": path, "test": path}`` for a built-in task.

    Raises ``KeyError`` (listing the known names) for an unknown task.
    """
    if name not in TASKS:
        raise KeyError(f"unknown built-in task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    tdir = BUILTIN_DIR / "tasks" / name
    out: dict[str, Path] = {}
    for split in SPLITS:
        plain, gz = tdir / f"{split}.jsonl", tdir / f"{split}.jsonl.gz"
        if plain.exists():
            out[split] = plain
        elif gz.exists():
            out[split] = gz
        else:
            raise FileNotFoundError(f"built-in task {name!r} is missing its {split!r} split in {tdir}")
    return out


def read_task(name: str, split: str) -> list[dict]:
    """Load one split of a built-in task as a list of dicts."""
    files = task_files(name)
    if split not in files:
        raise KeyError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    path = files[split]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
