"""Checks on the datasets shipped in ``seekformer.data.builtin`` (fast, stdlib only)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pytest

from seekformer.data import builtin
from seekformer.data.builtin import TASKS, corpus_paths, read_corpus_documents, read_task, task_files

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, list[dict]]]:
    return {name: {s: read_task(name, s) for s in SPLITS} for name in TASKS}


# --------------------------------------------------------------------------- corpus


def test_corpus_files_exist_and_decompress():
    paths = corpus_paths()
    assert [p.name for p in paths] == sorted(p.name for p in paths)
    assert {p.name for p in paths} >= {"sotu.txt.gz", "moby_dick.txt.gz", "shakespeare.txt.gz"}
    total = 0
    for p in paths:
        assert p.is_file() and p.suffixes[-2:] == [".txt", ".gz"]
        with gzip.open(p, "rt", encoding="utf-8") as fh:
            text = fh.read()
        assert "\r" not in text
        assert "\n\n\n\n" not in text  # documents separated by exactly two blank lines
        total += len(text.encode("utf-8"))
    assert total > 2_000_000
    assert sum(p.stat().st_size for p in paths) < 3_000_000


def test_corpus_documents():
    docs = list(read_corpus_documents())
    assert len(docs) > 100
    assert all(d.strip() for d in docs)
    assert all("\n\n\n" not in d for d in docs)
    assert any(d.startswith("CHAPTER 1. Loomings.") for d in docs)
    assert sum(map(len, docs)) > 2_000_000


def test_builtin_module_does_not_import_torch():
    # Load the module file on its own (the parent ``seekformer`` package may import
    # torch itself): the data API must be pure standard library.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_builtin_data', {str(builtin.__file__)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "assert mod.corpus_paths() and mod.task_files('fortunes')\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- task files


def test_task_files_layout():
    assert set(TASKS) == {"fortunes", "brown_pos", "kjv_es"}
    assert TASKS["fortunes"]["type"] == "classification"
    assert TASKS["brown_pos"]["type"] == "tagging"
    assert TASKS["kjv_es"]["type"] == "generation"
    assert len(TASKS["brown_pos"]["labels"]) == 12
    for name in TASKS:
        files = task_files(name)
        assert list(files) == list(SPLITS)
        for path in files.values():
            assert path.is_file() and path.stat().st_size > 0
            assert path.name.endswith((".jsonl", ".jsonl.gz"))


def test_unknown_task_raises_keyerror_listing_names():
    with pytest.raises(KeyError) as ei:
        task_files("no_such_task")
    msg = str(ei.value)
    for name in TASKS:
        assert name in msg


def test_split_proportions(splits):
    for name, parts in splits.items():
        n = {s: len(parts[s]) for s in SPLITS}
        total = sum(n.values())
        assert all(v > 0 for v in n.values()), name
        assert 0.75 <= n["train"] / total <= 0.85, (name, n)
        assert 0.07 <= n["validation"] / total <= 0.13, (name, n)


# --------------------------------------------------------------------------- per task


def test_fortunes_records(splits):
    labels = set(TASKS["fortunes"]["labels"])
    total = 0
    for recs in splits["fortunes"].values():
        for r in recs:
            assert set(r) == {"text", "label"}
            assert isinstance(r["text"], str) and r["text"].strip()
            assert len(r["text"]) <= 400
            assert r["text"] == " ".join(r["text"].split())
            assert r["label"] in labels
        total += len(recs)
    assert 2000 <= total <= 6000
    seen = {r["label"] for recs in splits["fortunes"].values() for r in recs}
    assert seen == labels


def test_fortunes_no_overlap_between_splits(splits):
    texts = {s: {r["text"] for r in splits["fortunes"][s]} for s in SPLITS}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]


def test_brown_pos_records(splits):
    labels = set(TASKS["brown_pos"]["labels"])
    total = 0
    for recs in splits["brown_pos"].values():
        for r in recs:
            assert set(r) == {"tokens", "tags", "brown_tags"}
            toks, tags, fine = r["tokens"], r["tags"], r["brown_tags"]
            assert isinstance(toks, list) and all(isinstance(t, str) and t for t in toks)
            assert len(toks) == len(tags) == len(fine)
            assert 3 <= len(toks) <= 40
            assert set(tags) <= labels
            assert all(isinstance(t, str) and t for t in fine)
        total += len(recs)
    assert 3000 <= total <= 5000


def test_brown_pos_mapping_is_sensible(splits):
    pairs = [(w.lower(), t) for r in splits["brown_pos"]["train"] for w, t in zip(r["tokens"], r["tags"])]
    tag_of = {}
    for w, t in pairs:
        tag_of.setdefault(w, set()).add(t)
    assert tag_of["the"] == {"DET"}
    assert "ADP" in tag_of["of"]
    assert tag_of[","] == {"."}
    assert "CONJ" in tag_of["and"]


def test_kjv_es_records(splits):
    total = 0
    books = set()
    for recs in splits["kjv_es"].values():
        for r in recs:
            assert set(r) == {"source", "target", "ref"}
            assert isinstance(r["source"], str) and r["source"].strip()
            assert isinstance(r["target"], str) and r["target"].strip()
            assert len(r["source"]) <= 200
            assert "<" not in r["target"] and "<" not in r["source"]
            book, cv = r["ref"].rsplit(" ", 1)
            chapter, verse = cv.split(":")
            assert int(chapter) >= 1 and int(verse) >= 1
            books.add(book)
        total += len(recs)
    assert 3000 <= total <= 6000
    assert len(books) > 30
    refs = [r["ref"] for recs in splits["kjv_es"].values() for r in recs]
    assert len(refs) == len(set(refs))


def test_module_exports():
    assert builtin.BUILTIN_DIR.is_dir()
    assert (builtin.BUILTIN_DIR / "SOURCES.md").is_file()
