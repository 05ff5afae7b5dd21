"""Errors a user can cause. The CLI prints them in one line and exits with code 2."""

from __future__ import annotations


class SeekformerError(Exception):
    """Base class: a mistake the user can fix. The message says what to do."""


class ConfigError(SeekformerError):
    """An invalid or inconsistent model configuration."""


class RecipeError(SeekformerError):
    """An unknown recipe key, a value of the wrong type, or an unreadable recipe file."""


class DataError(SeekformerError):
    """A missing data path, an empty corpus, a malformed record."""


class CheckpointError(SeekformerError):
    """A checkpoint directory that is missing, truncated, corrupt or does not match the config."""


class TokenizerError(SeekformerError):
    """A tokenizer that cannot be trained or loaded."""


class GenerationError(SeekformerError):
    """Bad generation input: empty prompt, prompt longer than the context, bad option values."""


class TaskError(SeekformerError):
    """A fine-tuning task that is misdeclared or whose data does not match its type."""


class OutputPathError(SeekformerError):
    """An output path that cannot be a directory (a file is in the way) or holds another run."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped a training loop after it saved `checkpoint` (resume with `--resume`).

    Not a SeekformerError (nothing to fix) and not a KeyboardInterrupt, so that it reaches the CLI through
    typer; the CLI prints "interrupted" and exits with 128 + `signum`."""

    def __init__(self, signum: int, checkpoint=None) -> None:
        super().__init__(f"interrupted by signal {signum}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint
