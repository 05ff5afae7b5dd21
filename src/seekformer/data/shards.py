"""Tokenized, packed, memory-mapped shards and the training / evaluation batch loaders.

`build_shards` streams the documents of the sources (`corpus.iter_document_pieces`), tokenizes them in
batches, appends `<|end_of_text|>` after every document and appends the ids to raw binary files
`OUT/{train,validation}-NNNNN.bin` (np.uint16 when the vocabulary fits, else np.uint32) of at most
`shard_tokens` tokens each. Only one batch of documents is in memory at a time. `OUT/manifest.json`
is written last (atomically): its presence marks a complete build, which a later call with the same
tokenizer, sources and split settings reuses instead of tokenizing again.

Each document goes to the validation split when a hash of (seed, document index) falls below
`val_fraction` -- reproducible and independent of corpus size. When that leaves validation empty,
its tail is moved there: the last document when there are at least two (and it is at most half of
the tokens), else the last `ceil(val_fraction * tokens)` tokens of the (single, huge) document.

`PackedBatches` cuts a split into non-overlapping windows of `seq_len + 1` tokens (packed across
document boundaries, never across shard files) and serves them in a per-epoch permutation, endlessly,
with an exact-resume `state_dict`. `iter_eval_batches` serves the windows once, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..fsio import atomic_write_text
from ..errors import DataError
from .corpus import Source, check_sources, iter_document_pieces, sources_fingerprint

if TYPE_CHECKING:
    from ..tokenizer import SeekTokenizer

MANIFEST = "manifest.json"
FORMAT = "seekformer-shards/1"
SPLITS = ("train", "validation")
_SHARD_FILE_RE = re.compile(r"^(train|validation)-\d{5}\.bin$")
_MAX_BATCH_CHARS = 1 << 22  # also flush a tokenization batch after this many characters
_COPY_TOKENS = 1 << 22  # tokens copied at a time when moving a tail to validation


def token_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id (< vocab_size) fits in 16 bits, else np.uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_validation(seed: int, doc_index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown data split {split!r}: use one of {', '.join(SPLITS)}")


# ====================================================================== writing
class _ShardWriter:
    """Appends token ids to `{split}-00000.bin`, `{split}-00001.bin`, ... (at most `shard_tokens` each).

    `shards` is the manifest's list of {"file", "tokens"}; a file is created only when it gets tokens.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._fh = None

    def write(self, ids: np.ndarray) -> None:
        """Append a 1-D array of ids (any integer dtype)."""
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._fh = open(self.directory / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            n = min(self.shard_tokens - self.shards[-1]["tokens"], ids.size)
            self._fh.write(ids[:n].tobytes())
            self.shards[-1]["tokens"] += n
            self.tokens += n
            ids = ids[n:]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def move_tail(self, start: int, dest: _ShardWriter) -> None:
        """Move tokens [start, self.tokens) to the end of `dest` (chunk by chunk), truncating this split."""
        self.close()
        kept, offset = [], 0
        for shard in self.shards:
            path = self.directory / shard["file"]
            first = max(start - offset, 0)  # first moved token inside this shard
            offset += shard["tokens"]
            if first >= shard["tokens"]:
                kept.append(shard)
                continue
            tokens = np.memmap(path, dtype=self.dtype, mode="r")
            for a in range(first, shard["tokens"], _COPY_TOKENS):
                dest.write(np.array(tokens[a:a + _COPY_TOKENS]))
            del tokens
            if first == 0:
                path.unlink()
            else:
                os.truncate(path, first * self.dtype.itemsize)
                kept.append({"file": shard["file"], "tokens": first})
        self.shards, self.tokens = kept, start


def _remove_shard_files(directory: Path) -> None:
    for f in directory.iterdir():
        if _SHARD_FILE_RE.match(f.name):
            f.unlink()


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """Yield `advance(documents, tokens)`; shows a rich progress line when `enabled`."""
    if not enabled:
        yield lambda docs, tokens: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("tokenizing: {task.fields[docs]:,} documents, {task.completed:,.0f} tokens"
                                           " ({task.fields[rate]:,.0f} tokens/s)"), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("tokenize", total=None, docs=0, rate=0.0)
        docs_done, start = 0, time.perf_counter()

        def advance(docs: int, tokens: int) -> None:
            nonlocal docs_done
            docs_done += docs
            bar.update(task, advance=tokens, docs=docs_done)
            bar.update(task, rate=bar.tasks[task].completed / max(time.perf_counter() - start, 1e-9))

        yield advance


def _tokenize_into(pieces: Iterable[tuple[str, bool]], tokenizer: SeekTokenizer,
                   writers: dict[str, _ShardWriter], seed: int, val_fraction: float, batch_docs: int,
                   advance: Callable[[int, int], None]) -> tuple[dict[str, int], int]:
    """Tokenize document pieces in batches into the split writers.

    Returns ({split: documents}, offset in the train split where the last train document starts).
    """
    documents = dict.fromkeys(SPLITS, 0)
    last_train_start = 0
    batch: list[tuple[str, bool, bool, str]] = []  # (piece, starts_document, ends_document, split)
    chars = 0

    def flush() -> None:
        nonlocal last_train_start, chars
        ids = tokenizer.encode_batch([b[0] for b in batch])
        out: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        offset = {s: writers[s].tokens for s in SPLITS}
        for (_, starts, ends, split), toks in zip(batch, ids):
            if ends:
                toks.append(tokenizer.eos_token_id)
            if starts and split == "train":
                last_train_start = offset["train"]
            out[split].append(toks)
            offset[split] += len(toks)
        for s in SPLITS:
            if out[s]:
                writers[s].write(np.array(list(itertools.chain.from_iterable(out[s])), dtype=np.int64))
        advance(sum(b[2] for b in batch), sum(map(len, ids)))
        batch.clear()
        chars = 0

    in_document, split, index = False, "train", 0
    for piece, ends in pieces:
        starts = not in_document
        if starts:
            split = "validation" if is_validation(seed, index, val_fraction) else "train"
            documents[split] += 1
            index += 1
        in_document = not ends
        batch.append((piece, starts, ends, split))
        chars += len(piece)
        if len(batch) >= batch_docs or chars >= _MAX_BATCH_CHARS:
            flush()
    if batch:
        flush()
    return documents, last_train_start


def build_shards(sources: Source | Iterable[Source], tokenizer: SeekTokenizer, out_dir: str | os.PathLike,
                 val_fraction: float = 0.02, seed: int = 0, shard_tokens: int = 2**26, text_key: str = "text",
                 batch_docs: int = 256, progress: bool = False) -> ShardSet:
    """Tokenize `sources` into packed shards under `out_dir` (see the module docstring) and return them.

    Reuses a complete build in `out_dir` made with the same tokenizer (fingerprint), sources (names and
    file sizes/mtimes), text_key, seed, val_fraction and shard_tokens. Raises DataError for missing
    sources, malformed records or a corpus without text.
    """
    sources = check_sources(sources)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or batch_docs < 1:
        raise DataError(f"shard_tokens and batch_docs must be >= 1, got {shard_tokens} and {batch_docs}")
    out = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    spec = {
        "format": FORMAT, "tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id, "dtype": dtype.name, "sources": sources,
        "sources_fingerprint": sources_fingerprint(sources), "text_key": text_key, "seed": seed,
        "val_fraction": val_fraction, "shard_tokens": shard_tokens,
    }
    with contextlib.suppress(DataError):
        existing = ShardSet.load(out)
        if all(existing.manifest.get(k) == v for k, v in spec.items()):
            return existing

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory holds no complete build
    _remove_shard_files(out)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    try:
        with _progress(progress) as advance:
            documents, last_train_start = _tokenize_into(
                iter_document_pieces(sources, text_key), tokenizer, writers, seed, val_fraction, batch_docs, advance)
        train, val = writers["train"], writers["validation"]
        if train.tokens + val.tokens == 0:
            raise DataError(f"corpus is empty: no text in {', '.join(sources)}; check the paths "
                            "(and --text-key for JSONL / Hugging Face data)")
        if val_fraction > 0 and val.tokens == 0 and train.tokens >= 2:
            last_doc = train.tokens - last_train_start
            if documents["train"] >= 2 and last_doc <= train.tokens // 2:
                start = last_train_start
                documents["train"] -= 1
            else:  # one document dominates: split its tail off (at most half of the tokens)
                start = train.tokens - min(max(1, math.ceil(val_fraction * train.tokens)), train.tokens // 2)
            documents["validation"] += 1
            train.move_tail(start, val)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.close()
        _remove_shard_files(out)
        raise
    manifest = {**spec, "documents": documents, "splits": {s: w.shards for s, w in writers.items()}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return ShardSet(out, manifest)


# ====================================================================== reading
class ShardSet:
    """A complete shard build: `directory/manifest.json` and the shard files it lists.

    Attributes: `directory` (Path), `manifest` (dict), `dtype` (np.dtype), `vocab_size` (int).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = int(manifest["vocab_size"])

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> ShardSet:
        """Open a build; DataError when it is missing, incomplete or corrupt."""
        d = Path(out_dir)
        f = d / MANIFEST
        if not f.is_file():
            raise DataError(f"no complete token shards in {d} ({MANIFEST} missing): build them first "
                            "(build_shards, or a pretrain run)")
        try:
            manifest = json.loads(f.read_text(encoding="utf-8"))
            ok = manifest.get("format") == FORMAT and all(s in manifest["splits"] for s in SPLITS)
            shard_set = cls(d, manifest)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{f} is corrupt or from another version: delete {d} and build the shards again")
        for split in SPLITS:
            for shard in manifest["splits"][split]:
                path = d / shard["file"]
                if not path.is_file() or path.stat().st_size != shard["tokens"] * shard_set.dtype.itemsize:
                    raise DataError(f"shard file {path} is missing or truncated: delete {d} and build the shards again")
        return shard_set

    def split_tokens(self, split: str) -> int:
        """Number of tokens in `split` ("train" or "validation")."""
        _check_split(split)
        return sum(int(s["tokens"]) for s in self.manifest["splits"][split])

    def memmaps(self, split: str) -> list[np.memmap]:
        """Read-only 1-D memory maps of the shard files of `split`, in order."""
        _check_split(split)
        return [np.memmap(self.directory / s["file"], dtype=self.dtype, mode="r", shape=(int(s["tokens"]),))
                for s in self.manifest["splits"][split]]


class Windows:
    """The non-overlapping windows of `length` tokens of one split; no window crosses a shard file.
    `count` windows, read by index (`read`): the records of DP pretraining (training/privacy/pretrain.py)."""

    def __init__(self, shards: ShardSet, split: str, length: int) -> None:
        self.maps = shards.memmaps(split)
        self.length = length
        self.first = np.cumsum([0] + [len(m) // length for m in self.maps])  # first window index per shard
        self.count = int(self.first[-1])
        if self.count == 0:
            raise DataError(f"the {split} split has {shards.split_tokens(split)} tokens, fewer than one window of "
                            f"seq_len + 1 = {length}: use a smaller seq_len or more data")

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Windows `indices` (1-D ints) -> LongTensor [len(indices), length]."""
        out = np.empty((len(indices), self.length), dtype=np.int64)
        shard_of = np.searchsorted(self.first, indices, side="right") - 1
        for row, (w, s) in enumerate(zip(indices, shard_of)):
            start = (int(w) - int(self.first[s])) * self.length
            out[row] = self.maps[s][start:start + self.length]
        return torch.from_numpy(out)


class PackedBatches:
    """The training loader: endless batches of packed windows, LongTensor [batch_size, seq_len + 1].

    Use `x = b[:, :-1]`, `y = b[:, 1:]` (or pass `b` as labels to a model that shifts internally).
    Epoch `e` visits every window once, in the order `np.random.default_rng([seed, e]).permutation`
    (or in order when `shuffle=False`). With `world_size > 1`, every step consumes
    `batch_size * world_size` windows and rank `r` gets the r-th slice of them. `state_dict()` /
    `load_state_dict()` resume exactly: the next batch equals the one an uninterrupted loader gives.
    """

    def __init__(self, shards: ShardSet, split: str, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self._windows = Windows(shards, split, seq_len + 1)
        self.windows_per_epoch = self._windows.count
        self.epoch = 0
        self.index = 0  # position in this epoch's order
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = self.windows_per_epoch
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch, LongTensor [batch_size, seq_len + 1]."""
        need = self.batch_size * self.world_size
        picked = []
        while need:
            n = min(need, self.windows_per_epoch - self.index)
            picked.append(self._order(self.epoch)[self.index:self.index + n])
            need -= n
            self.index += n
            if self.index == self.windows_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
        step = np.concatenate(picked)
        return self._windows.read(step[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "shuffle": self.shuffle, "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict`); DataError when it belongs to other data or settings."""
        for key in ("seed", "seq_len", "shuffle", "windows_per_epoch"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data loader: it was saved with {key}={state[key]}, now "
                                f"{getattr(self, key)}; resume with the same data, seed and seq_len")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.windows_per_epoch:
            raise DataError(f"cannot resume the data loader: position epoch={epoch}, index={index} is invalid")
        self.epoch, self.index = epoch, index


def iter_eval_batches(shards: ShardSet, split: str, seq_len: int, batch_size: int,
                      max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """The windows of `split` in order, once: LongTensor [<= batch_size, seq_len + 1] (the last batch
    may be smaller), at most `max_batches` batches. Same windows as `PackedBatches(shuffle=False)`."""
    windows = Windows(shards, split, seq_len + 1)
    n = windows.count if max_batches is None else min(windows.count, max_batches * batch_size)
    for a in range(0, n, batch_size):
        yield windows.read(np.arange(a, min(a + batch_size, n)))
