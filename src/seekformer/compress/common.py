"""Helpers shared by the compress verbs: load a model directory with its tokenizer, check an output path."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SeekformerError


class CompressError(SeekformerError):
    """A compress / export request that cannot be honoured (bad option, wrong kind of model, bad output)."""


def check_out(out: str | os.PathLike, source: str | os.PathLike | None = None, is_file: bool = False) -> Path:
    """An output path we can write: not the source, its parent writable. Raises CompressError."""
    p = Path(out).expanduser()
    if source is not None and p.resolve() == Path(source).resolve():
        raise CompressError(f"--out {p} is the input model; write the result to a new directory")
    if is_file and p.is_dir():
        raise CompressError(f"{p} is a directory; pass a file name such as model.gguf")
    if not is_file and p.exists() and not p.is_dir():
        raise CompressError(f"--out {p} exists and is not a directory")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise CompressError(f"cannot write {p}: {parent} is not writable")
    return p


def load_with_tokenizer(model_dir: str | os.PathLike):
    """(model in eval mode, tokenizer or None, path) of a model directory, through the one loader
    (models/loading.py); a directory without tokenizer.json gives None for the tokenizer."""
    from ..checkpoint import check_model_dir
    from ..models.loading import load_model_and_tokenizer

    path = check_model_dir(model_dir)
    model, tok = load_model_and_tokenizer(path, require_tokenizer=False)
    return model, tok, path
