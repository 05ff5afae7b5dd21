"""Corpus sources, token shards, and the training / evaluation batch loaders."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seekformer.data import corpus, shards
from seekformer.data.builtin import read_corpus_documents
from seekformer.data.corpus import check_sources, iter_document_pieces, iter_documents
from seekformer.data.shards import PackedBatches, ShardSet, build_shards, iter_eval_batches, token_dtype
from seekformer.errors import DataError
from seekformer.tokenizer import SeekTokenizer

WORDS = ("the whale sea ship captain harpoon ocean wind sail deck crew storm island night light "
         "state union nation people congress law war peace king queen love sword crown").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct documents of 20-120 words (each starts with its index)."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))) + "."
            for i in range(n)]


DOCS = make_docs(60)


@pytest.fixture(scope="module")
def tok() -> SeekTokenizer:
    return SeekTokenizer.train(texts=DOCS, vocab_size=320)


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n\n".join(DOCS) + "\n")
    return f


def split_docs(ss: ShardSet, split: str, tok: SeekTokenizer) -> list[str]:
    """The documents of a split, decoded (tokens are cut at eos)."""
    ids = np.concatenate([np.asarray(m) for m in ss.memmaps(split)]) if ss.split_tokens(split) else np.array([])
    docs, start = [], 0
    for end in np.flatnonzero(ids == tok.eos_token_id):
        docs.append(tok.decode(ids[start:end]))
        start = end + 1
    assert start == len(ids), "every split ends with an eos"
    return docs


# ====================================================================== corpus
def test_text_file_documents(tmp_path):
    f = tmp_path / "a.md"
    f.write_text("\n\nfirst doc\nline two\n\n\n\n\n\n   \n\n\nsecond doc\n\n\nthird\n")
    assert list(iter_documents([f])) == ["first doc\nline two", "second doc", "third"]
    g = tmp_path / "b.txt"
    g.write_text("one document\n\nwith a paragraph\n")
    assert list(iter_documents(g)) == ["one document\n\nwith a paragraph"]  # a single path is accepted too


def test_gz_and_jsonl_sources(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("gz one\n\n\ngz twö 🤖")
    rows = [{"text": "json one", "id": 1}, {"text": ""}, {"text": "json\n\n\ntwo"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"body": "custom key"}) + "\n")
    assert list(iter_documents([tmp_path / "a.txt.gz", tmp_path / "b.jsonl"])) == \
        ["gz one", "gz twö 🤖", "json one", "json\n\n\ntwo"]  # a JSONL record is never split
    assert list(iter_documents([tmp_path / "c.jsonl.gz"], text_key="body")) == ["custom key"]


def test_directory_source_sorted_recursive_no_hidden(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "c"}) + "\n")
    (tmp_path / "sub" / "deeper" / "d.txt").write_text("d")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "config").write_text("hidden too")
    assert list(iter_documents([tmp_path])) == ["a", "b", "c", "d"]


def test_builtin_source():
    docs = iter_documents(["builtin"])
    assert [next(docs) for _ in range(3)] == [d for _, d in zip(range(3), read_corpus_documents())]


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_sources([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="no data sources"):
        check_sources([])
    with pytest.raises(DataError, match="hf:NAME"):
        check_sources(["hf:a:b:c:d"])
    with pytest.raises(DataError, match="does not exist"):
        check_sources([f"hf:{tmp_path}/nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3"):
        list(iter_documents([bad]))
    bad.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(DataError, match=r"line 2: no string field 'text'"):
        list(iter_documents([bad]))
    binary = tmp_path / "img.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_documents([binary]))


def test_long_documents_stream_in_pieces(tmp_path, monkeypatch):
    """Pieces are bounded, join back to the documents, and the separator is found across read chunks."""
    text = "\n\n\n".join(DOCS[:10]) + "\n\n\n" + "no line breaks here " * 40 + "\n\n\n" + "x" * 333
    f = tmp_path / "long.txt"
    f.write_text(text)
    expected = list(iter_documents([f]))
    assert len(expected) == 12
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 50)
    monkeypatch.setattr(corpus, "_READ_CHARS", 7)
    pieces = list(iter_document_pieces([f]))
    assert all(len(p) <= 50 for p, _ in pieces)
    assert sum(ends for _, ends in pieces) == 12 and len(pieces) > 30
    assert list(iter_documents([f])) == expected


def test_hf_local_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["hf one", "", "hf two"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert list(iter_documents([f"hf:{tmp_path / 'ds'}"])) == ["hf one", "hf two"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["t"]}),
                               "validation": datasets.Dataset.from_dict({"body": ["v1", "v2"]})})
    dd.save_to_disk(tmp_path / "dd")
    assert list(iter_documents([f"hf:{tmp_path / 'dd'}:validation"], text_key="body")) == ["v1", "v2"]
    with pytest.raises(DataError, match="no split 'test'"):
        list(iter_documents([f"hf:{tmp_path / 'dd'}:test"]))
    with pytest.raises(DataError, match="no string field 'text'"):
        list(iter_documents([f"hf:{tmp_path / 'dd'}"]))


def test_hf_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"seekformer\[hf\]"):
        list(iter_documents(["hf:some/dataset"]))


# ====================================================================== shards
def test_build_shards_contents(tok, corpus_file, tmp_path):
    ss = build_shards([corpus_file], tok, tmp_path / "s", val_fraction=0.2, seed=0)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size and m["seed"] == 0
    assert m["tokenizer_fingerprint"] == tok.fingerprint and m["sources"] == [str(corpus_file.resolve())]
    assert all(isinstance(s["tokens"], int) for split in m["splits"].values() for s in split)
    assert ss.split_tokens("train") + ss.split_tokens("validation") == sum(len(tok.encode(d)) + 1 for d in DOCS)
    train, val = split_docs(ss, "train", tok), split_docs(ss, "validation", tok)
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)
    assert [d for d in DOCS if d in set(train)] == train  # the corpus order is kept within a split
    assert m["documents"] == {"train": len(train), "validation": len(val)}
    with pytest.raises(DataError, match="unknown data split"):
        ss.split_tokens("test")


def test_build_is_deterministic_and_seeded(tok, corpus_file, tmp_path):
    a = build_shards([corpus_file], tok, tmp_path / "a", val_fraction=0.3, seed=1)
    b = build_shards([corpus_file], tok, tmp_path / "b", val_fraction=0.3, seed=1, shard_tokens=97)
    c = build_shards([corpus_file], tok, tmp_path / "c", val_fraction=0.3, seed=2)
    for split in ("train", "validation"):
        assert np.array_equal(np.concatenate(a.memmaps(split)), np.concatenate(b.memmaps(split)))
    assert split_docs(a, "validation", tok) != split_docs(c, "validation", tok)
    assert all(s["tokens"] <= 97 for s in b.manifest["splits"]["train"]) and len(b.memmaps("train")) > 5


def test_manifest_reuse_and_rebuild(tok, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "s"
    first = build_shards([corpus_file], tok, out)
    calls = []
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts, **kw: calls.append(1) or real(texts, **kw))
    again = build_shards([str(corpus_file)], tok, out)
    assert not calls and again.manifest == first.manifest
    build_shards([corpus_file], tok, out, seed=5)  # other settings: tokenized again
    assert calls
    calls.clear()
    corpus_file.write_text("\n\n\n".join(DOCS[:30]))  # an edited source: tokenized again
    rebuilt = build_shards([corpus_file], tok, out, seed=5)
    assert calls and rebuilt.split_tokens("train") + rebuilt.split_tokens("validation") < \
        first.split_tokens("train") + first.split_tokens("validation")
    assert ShardSet.load(out).manifest == rebuilt.manifest


def test_incomplete_or_corrupt_build(tok, corpus_file, tmp_path):
    out = tmp_path / "s"
    ss = build_shards([corpus_file], tok, out, shard_tokens=500)
    f = out / ss.manifest["splits"]["train"][1]["file"]
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        ShardSet.load(out)
    assert build_shards([corpus_file], tok, out, shard_tokens=500).manifest == ss.manifest  # repaired
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json missing"):
        ShardSet.load(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        ShardSet.load(out)


def test_failed_build_leaves_nothing(tok, tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "{broken\n")
    out = tmp_path / "s"
    with pytest.raises(DataError, match=r"line 61"):
        build_shards([src], tok, out, batch_docs=8, shard_tokens=200)
    assert list(out.iterdir()) == []


def test_empty_corpus(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n \n\n\n\t\n")
    with pytest.raises(DataError, match="corpus is empty"):
        build_shards([tmp_path / "empty.txt"], tok, tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists()


class _WideVocab:
    """A tokenizer stand-in with a vocabulary too large for uint16 (ids shifted up by 65536)."""

    def __init__(self, tok: SeekTokenizer) -> None:
        self.tok, self.vocab_size, self.fingerprint = tok, 70000, "wide" + tok.fingerprint
        self.eos_token_id = tok.eos_token_id + 65536

    def encode_batch(self, texts):
        return [[i + 65536 for i in ids] for ids in self.tok.encode_batch(texts)]


def test_dtype_selection(tok, corpus_file, tmp_path):
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    narrow = build_shards([corpus_file], tok, tmp_path / "n", val_fraction=0.0)
    wide = build_shards([corpus_file], _WideVocab(tok), tmp_path / "w", val_fraction=0.0)
    assert wide.manifest["dtype"] == "uint32" and wide.memmaps("train")[0].dtype == np.uint32
    assert np.array_equal(np.concatenate(wide.memmaps("train")).astype(np.int64) - 65536,
                          np.concatenate(narrow.memmaps("train")).astype(np.int64))
    assert narrow.split_tokens("validation") == 0
    with pytest.raises(DataError, match="seq_len"):
        PackedBatches(narrow, "validation", 16, 2, seed=0)


def test_single_document_tail_goes_to_validation(tok, tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(" ".join(DOCS))
    ss = build_shards([f], tok, tmp_path / "s", val_fraction=0.05)
    stream = np.array(tok.encode(" ".join(DOCS)) + [tok.eos_token_id])
    n_val = ss.split_tokens("validation")
    assert n_val == int(np.ceil(0.05 * len(stream)))
    assert np.array_equal(np.concatenate(ss.memmaps("train")), stream[:-n_val])
    assert np.array_equal(np.concatenate(ss.memmaps("validation")), stream[-n_val:])


def test_validation_gets_a_document_when_the_hash_gives_none(tok, tmp_path):
    f = tmp_path / "two.txt"
    f.write_text(DOCS[0] + "\n\n\n" + DOCS[1] + "\n\n\n" + DOCS[2])
    ss = build_shards([f], tok, tmp_path / "s", val_fraction=1e-9, shard_tokens=20)
    assert split_docs(ss, "validation", tok) == [DOCS[2]]
    assert split_docs(ss, "train", tok) == DOCS[:2]
    assert ss.manifest["documents"] == {"train": 2, "validation": 1}


def test_long_documents_tokenized_in_pieces(tok, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 40)  # every document is cut into several pieces
    ss = build_shards([corpus_file], tok, tmp_path / "s", val_fraction=0.2, batch_docs=7)
    train, val = split_docs(ss, "train", tok), split_docs(ss, "validation", tok)
    assert val and sorted(train + val) == sorted(DOCS)  # one eos per document, text intact
    f = tmp_path / "three.txt"
    f.write_text("\n\n\n".join(DOCS[:3]))
    ss = build_shards([f], tok, tmp_path / "t", val_fraction=1e-9, batch_docs=2)
    assert split_docs(ss, "validation", tok) == [DOCS[2]]  # the whole multi-piece last document moved


def test_hf_source_builds(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "ds")
    ss = build_shards([f"hf:{tmp_path / 'ds'}"], tok, tmp_path / "s", val_fraction=0.2)
    assert sorted(split_docs(ss, "train", tok) + split_docs(ss, "validation", tok)) == sorted(DOCS)


# ====================================================================== loaders
@pytest.fixture(scope="module")
def shard_set(tok, tmp_path_factory) -> ShardSet:
    d = tmp_path_factory.mktemp("shards")
    (d / "corpus.txt").write_text("\n\n\n".join(DOCS))
    return build_shards([d / "corpus.txt"], tok, d / "out", val_fraction=0.2, shard_tokens=700)


def test_windows_are_packed_shard_slices(shard_set):
    seq_len, bs = 15, 4
    loader = PackedBatches(shard_set, "train", seq_len, bs, seed=0)
    maps = shard_set.memmaps("train")
    assert loader.windows_per_epoch == sum(len(m) // (seq_len + 1) for m in maps)
    all_windows = {tuple(m[i:i + seq_len + 1]) for m in maps for i in range(0, len(m) - seq_len, seq_len + 1)}
    seen = []
    for _ in range(loader.windows_per_epoch // bs):
        b = loader.next_batch()
        assert b.shape == (bs, seq_len + 1) and b.dtype == torch.int64
        seen += [tuple(r) for r in b.tolist()]
    assert len(set(seen)) == len(seen) and set(seen) <= all_windows  # no window twice in an epoch


def test_batches_deterministic_and_seeded(shard_set):
    def first(seed, shuffle=True):
        loader = PackedBatches(shard_set, "train", 15, 4, seed=seed, shuffle=shuffle)
        return torch.cat([loader.next_batch() for _ in range(5)])

    assert torch.equal(first(3), first(3))
    assert not torch.equal(first(3), first(4))
    ordered = first(3, shuffle=False)
    maps = shard_set.memmaps("train")
    assert ordered[0].tolist() == maps[0][:16].tolist() and ordered[1].tolist() == maps[0][16:32].tolist()


def test_exact_resume_across_epochs(shard_set, tmp_path):
    a = PackedBatches(shard_set, "train", 15, 7, seed=11)
    steps = a.windows_per_epoch // 7 + 3  # the resumed stretch crosses an epoch boundary
    for _ in range(steps):
        a.next_batch()
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.next_batch() for _ in range(steps)]
    assert a.epoch >= 1
    b = PackedBatches(shard_set, "train", 15, 7, seed=11)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(x, b.next_batch()) for x in expected)
    c = PackedBatches(shard_set, "train", 31, 7, seed=11)
    with pytest.raises(DataError, match="seq_len"):
        c.load_state_dict(a.state_dict())


def test_ranks_split_the_global_batch(shard_set):
    whole = PackedBatches(shard_set, "train", 15, 6, seed=2)
    ranks = [PackedBatches(shard_set, "train", 15, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert torch.equal(whole.next_batch(), torch.cat([r.next_batch() for r in ranks]))


def test_eval_batches(shard_set):
    batches = list(iter_eval_batches(shard_set, "validation", 15, 4))
    again = list(iter_eval_batches(shard_set, "validation", 15, 4))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    loader = PackedBatches(shard_set, "validation", 15, 1, seed=0, shuffle=False)
    flat = torch.cat(batches)
    assert flat.shape[0] == loader.windows_per_epoch and all(b.shape[0] == 4 for b in batches[:-1])
    assert torch.equal(flat, torch.cat([loader.next_batch() for _ in range(flat.shape[0])]))
    assert len(list(iter_eval_batches(shard_set, "validation", 15, 4, max_batches=2))) == 2
    with pytest.raises(DataError, match="fewer than one window"):
        list(iter_eval_batches(shard_set, "validation", 100_000, 4))


def test_lazy_reexports():
    import seekformer.data as data

    assert data.build_shards is build_shards and data.iter_documents is iter_documents
    assert shards.SPLITS == ("train", "validation")
