"""Crash-safe file writes, below everything that writes files (checkpoint, tokenizer, data, training).

Every write goes to a hidden temporary file or directory beside its target (`.NAME.XXXX.tmp`), is
fsynced, then renamed into place: a crash mid-write leaves the previous version intact. A crash
(kill -9) can leave such a temporary behind; `remove_stale_temporaries` deletes them when the next run
starts in that directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputPathError


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where the OS cannot."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, stale: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success its files replace those of `path`.

    A new `path` appears in one rename. An existing one has each file replaced by an atomic rename
    (`*.safetensors` last), and files matching a glob of `stale` that the new content no longer has
    (e.g. the old shards of a model) are removed afterwards. On an exception nothing under `path` changes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if not path.exists():
            os.replace(tmp, path)
        else:
            new_files = sorted((p for p in tmp.rglob("*") if p.is_file()),
                               key=lambda p: (p.suffix == ".safetensors", str(p)))
            for f in new_files:
                dest = path / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
            names = {f.relative_to(tmp).as_posix() for f in new_files}
            for pattern in stale:
                for old in path.glob(pattern):
                    if old.is_file() and old.relative_to(path).as_posix() not in names:
                        old.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the hidden temporaries (`.NAME.*.tmp`, files or directories) that interrupted atomic writes of
    `names` (None: of any file) left in `directory`; returns what was removed. Call it only where no other
    process is writing."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for pattern in ([f".{n}.*.tmp" for n in names] if names is not None else [".*.tmp"]):
        for p in directory.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def check_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Raise OutputPathError when `path` (or a folder above it) exists but is not a directory."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise OutputPathError(
                    f"{what} {p}: {q} is a file, not a directory; choose another path")
            break
    return p
