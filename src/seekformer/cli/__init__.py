"""The `seekformer` command: one verb per workflow.

Each workflow registers its commands from its own module (train.py, generate.py, finetune.py, serve.py,
bench.py). A `SeekformerError` (a mistake the user can fix) is printed in one line and exits with code 2,
never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from ..errors import SeekformerError, TrainingInterrupted

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException as _ClickException
    from typer.exceptions import Abort as _Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort as _Abort
    from click.exceptions import ClickException as _ClickException

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pretrain, fine-tune, evaluate and serve DeepSeek-style MoE Transformers.")

# Modules that add commands to `app` (each has `register(app)`); missing ones are skipped.
COMMAND_MODULES = ("train", "generate", "finetune", "evaluate", "serve", "bench", "inspect",
                   "federated", "audit", "compress", "export")


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"seekformer {__version__}")
        raise typer.Exit()


def configure_logging(quiet: bool = False) -> None:
    """Library messages (the `seekformer` logger) go to stderr: INFO, or WARNING and up with --quiet."""
    import logging

    class _CurrentStderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is now (not the stream of the first call: in-process CLI runs,
        e.g. under pytest's capture, replace and close it)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("seekformer")
    if not any(getattr(h, "_seekformer_cli", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._seekformer_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors from the library."),
) -> None:
    """Pretrain, fine-tune, evaluate and serve DeepSeek-style MoE Transformers."""
    configure_logging(quiet)


@app.command("version")
def version() -> None:
    """Print the seekformer version."""
    from .. import __version__

    typer.echo(__version__)


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(app)


_register()


RANK_ERROR_GRACE_S = 3.0  # how long a rank other than 0 waits before it exits on a user error


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it once
        typer.echo(f"error: {message}", err=True)
    else:
        # the other ranks give rank 0 time to say it: torchrun stops every process once one exits
        import time

        time.sleep(RANK_ERROR_GRACE_S)
    raise SystemExit(2)


def interrupted(code: int = 130, checkpoint=None) -> None:
    """Print "interrupted" (and where a training run saved its state) and exit with `code` (128 + signal)."""
    typer.echo("interrupted" + (f"; state saved in {checkpoint} (continue with --resume)" if checkpoint else ""),
               err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the command; user mistakes exit 2 in one line, Ctrl-C exits 130."""
    from ..runtime import default_openmp_spin

    default_openmp_spin()  # before torch loads (`serve` then prefers PASSIVE); `import seekformer` changes nothing
    try:
        rv = app(args=argv, standalone_mode=False)
    except SeekformerError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except FileNotFoundError as e:
        fail(f"file not found: {e.filename or e}")
    except (NotADirectoryError, IsADirectoryError, PermissionError) as e:
        fail(f"{e.strerror or type(e).__name__}: {e.filename or e}")
    except TrainingInterrupted as e:
        interrupted(128 + e.signum, e.checkpoint)
    except KeyboardInterrupt:
        interrupted()
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive as exceptions in non-standalone mode
        if isinstance(e, _ClickException):
            e.show()
            raise SystemExit(2) from None
        if isinstance(e, _Abort):
            raise SystemExit(1) from None
        raise
    if rv == 130:  # typer's answer to a KeyboardInterrupt inside a command
        interrupted()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
