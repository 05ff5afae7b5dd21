"""Text sources -> documents, streamed (a corpus never has to fit in memory).

A source is one of
* a text file (any extension; `.gz` compressed too): one document per file, or several when the text
  contains the separator ``"\\n\\n\\n"`` (two blank lines), as the built-in corpus files do;
* a `.jsonl` / `.jsonl.gz` file: one JSON object per line, the document is ``obj[text_key]``;
* a directory: every file below it (recursively, sorted, hidden files and folders skipped);
* ``"builtin"``: the English corpus shipped in `seekformer.data.builtin`;
* ``"hf:NAME"``, ``"hf:NAME:SPLIT"`` or ``"hf:NAME:CONFIG:SPLIT"``: a Hugging Face dataset (split
  ``train`` by default), either a local directory written by `datasets.save_to_disk` or a hub dataset
  read with ``streaming=True``. Needs the optional extra ``seekformer[hf]``.

Documents lose their leading and trailing newlines; documents without any non-whitespace character
are skipped. The shard builder reads `iter_document_pieces`, which cuts very long documents into
pieces of at most `MAX_PIECE_CHARS` characters (at a line break when there is one), so that a single
multi-gigabyte file without separators streams too.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ..errors import DataError
from .builtin import corpus_paths, read_corpus_documents

DOC_SEPARATOR = "\n\n\n"
MAX_PIECE_CHARS = 1 << 16  # longest piece of a document handed to the tokenizer at once
_READ_CHARS = 1 << 20  # characters read from a text file at a time
BUILTIN = "builtin"
HF_PREFIX = "hf:"

Source = str | os.PathLike


# ====================================================================== checking sources
def _as_list(sources: Source | Iterable[Source]) -> list[Source]:
    return [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """"hf:NAME[:CONFIG]:SPLIT" -> (name, config, split)."""
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"cannot read the source {source!r}: write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def check_sources(sources: Source | Iterable[Source]) -> list[str]:
    """Validate `sources` up front and return them as strings (local paths made absolute).

    Raises DataError for an empty list, a missing path, or a malformed ``hf:`` source. A hub dataset
    name cannot be checked offline; it fails when it is read.
    """
    out = []
    for src in _as_list(sources):
        s = os.fspath(src)
        if s == BUILTIN:
            out.append(s)
        elif s.startswith(HF_PREFIX):
            name, config, split = parse_hf_source(s)
            looks_local = name.startswith(("/", ".", "~")) or Path(name).exists()
            if looks_local:
                path = Path(name).expanduser()
                if not path.is_dir():
                    raise DataError(f"data path {path} does not exist (or is not a directory saved with "
                                    "datasets' save_to_disk)")
                name = str(path.resolve())
            out.append(HF_PREFIX + ":".join(p for p in (name, config, split) if p))
        else:
            path = Path(s).expanduser()
            if not path.exists():
                raise DataError(f"data path {path} does not exist: check the path (or use 'builtin' or hf:NAME)")
            out.append(str(path.resolve()))
    if not out:
        raise DataError("no data sources given: pass files, directories, 'builtin' or hf:NAME")
    return out


def local_files(source: str) -> list[Path]:
    """The files a local source reads, in reading order (a directory: recursive, sorted, no hidden)."""
    if source == BUILTIN:
        return corpus_paths()
    if source.startswith(HF_PREFIX):
        name = parse_hf_source(source)[0]
        return local_files(name) if Path(name).is_dir() else []
    root = Path(source)
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)


def sources_fingerprint(sources: list[str]) -> str:
    """sha256 over the sources and the path, size and mtime of every local file they read: it changes
    when a file is added, removed or edited (hub datasets contribute their name only)."""
    h = hashlib.sha256()
    for source in sources:
        h.update(f"source\0{source}\0".encode())
        for f in local_files(source):
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


# ====================================================================== pieces
def _cut(buf: str, start: int, stop: int) -> int:
    """End of a piece `buf[start:end]` with `end <= stop`: after the last line break, else after the
    last space, else `stop`."""
    for ch in ("\n", " "):
        i = buf.rfind(ch, start, stop)
        if i > start:
            return i + 1
    return stop


def _split_stream(chunks: Iterable[str], separator: str | None) -> Iterator[tuple[str, bool]]:
    """Cut a stream of text chunks into documents at `separator` (None: the stream is one document),
    and documents into pieces of at most MAX_PIECE_CHARS. Yields (piece, ends_document); the pieces of
    a document concatenate to the document with its leading/trailing newlines removed. Documents
    without non-whitespace text are dropped."""
    buf, pos = "", 0  # unread text is buf[pos:]
    started = False  # the current document has yielded a piece already
    keep = len(separator) if separator else 0  # tail held back: a separator may straddle two chunks

    def finish(doc: str) -> Iterator[tuple[str, bool]]:
        doc = doc.rstrip("\n") if started else doc.strip("\n")
        if started or doc.strip():
            yield doc, True

    for chunk in chunks:
        buf, pos = buf[pos:] + chunk, 0
        while True:
            i = buf.find(separator, pos) if separator else -1
            if i >= 0:
                yield from finish(buf[pos:i])
                pos, started = i + len(separator), False
            elif len(buf) - pos - keep > MAX_PIECE_CHARS:
                end = _cut(buf, pos, pos + MAX_PIECE_CHARS)
                piece = buf[pos:end] if started else buf[pos:end].lstrip("\n")
                pos = end
                if started or piece:
                    started = True
                    yield piece, False
            else:
                break
    yield from finish(buf[pos:])


def _read_chunks(fh: TextIO, path: Path) -> Iterator[str]:
    try:
        while chunk := fh.read(_READ_CHARS):
            yield chunk
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: convert it, or remove it from the data sources") from None
    except (OSError, EOFError) as e:  # e.g. a truncated .gz
        raise DataError(f"cannot read {path} ({e}); the file is truncated or corrupt") from None


def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_texts(path: Path, text_key: str) -> Iterator[str]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(_lines(fh, path), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                raise DataError(f"{path}, line {lineno}: no string field {text_key!r}; fix the line or pass the "
                                "right --text-key")
            yield obj[text_key]


def _lines(fh: TextIO, path: Path) -> Iterator[str]:
    try:
        yield from fh
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: convert it, or remove it from the data sources") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); the file is truncated or corrupt") from None


def _hf_texts(source: str, text_key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs the Hugging Face datasets library: "
                        "pip install 'seekformer[hf]'") from None
    name, config, split = parse_hf_source(source)
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name} has no split {split!r} (it has {', '.join(ds)}): "
                                    f"use hf:{name}:SPLIT")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad name/offline/corrupt dir
        raise DataError(f"cannot load the Hugging Face dataset {source} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the name, split and network") from None
    for i, row in enumerate(ds):
        text = row.get(text_key)
        if not isinstance(text, str):
            cols = ", ".join(row)
            raise DataError(f"{source}, row {i}: no string field {text_key!r} (fields: {cols}); pass the right "
                            "--text-key")
        yield text


def _source_pieces(source: str, text_key: str) -> Iterator[tuple[str, bool]]:
    if source == BUILTIN:
        for doc in read_corpus_documents():
            yield from _split_stream([doc], None)
    elif source.startswith(HF_PREFIX):
        for text in _hf_texts(source, text_key):
            yield from _split_stream([text], None)
    else:
        for path in local_files(source):
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for text in _jsonl_texts(path, text_key):
                    yield from _split_stream([text], None)
            else:
                with _open_text(path) as fh:
                    yield from _split_stream(_read_chunks(fh, path), DOC_SEPARATOR)


# ====================================================================== public iterators
def iter_document_pieces(sources: Source | Iterable[Source], text_key: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield (piece, ends_document) over all documents of `sources`, in order; a document is one or more
    consecutive pieces (more only when longer than MAX_PIECE_CHARS). Memory use is bounded by the
    longest single JSON line / dataset row, never by the corpus."""
    for source in check_sources(sources):
        yield from _source_pieces(source, text_key)


def iter_documents(sources: Source | Iterable[Source], text_key: str = "text") -> Iterator[str]:
    """Yield the non-empty documents (str) of `sources`, in order (see the module docstring)."""
    parts: list[str] = []
    for piece, ends in iter_document_pieces(sources, text_key):
        parts.append(piece)
        if ends:
            yield "".join(parts)
            parts = []
