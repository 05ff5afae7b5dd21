"""`seekformer bench ...`: time seekformer against `transformers` on the same machine, in one run.

Each benchmark is one command of `bench_app`; add more with `@bench_app.command("name")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: seekformer vs transformers, same config and machine.")


@bench_app.command("train")
def train(
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="Model preset (repeatable; default: tiny and small)."),
    dtype: Optional[list[str]] = typer.Option(None, "--dtype", help="fp32 or bf16 autocast (repeatable; default both)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    steps: int = typer.Option(10, "--steps", help="Timed steps per model (after 2 warm-up steps)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for both (default: torch's choice)."),
    out: Path = typer.Option(Path("benchmarks/results/train.md"), "--out", help="Markdown table to write."),
    tune_malloc: bool = typer.Option(False, "--tune-malloc", help="Keep freed memory in the heap (glibc), both models."),
) -> None:
    """Training-step tokens/s and MFU of seekformer and transformers' DeepseekV3 (forward, backward, AdamW)."""
    from ..bench.train import run_train_bench
    from ..config import PRESETS
    from ..errors import ConfigError

    presets = preset or ["tiny", "small"]
    for p in presets:
        if p not in PRESETS:
            raise ConfigError(f"unknown preset {p!r}; choose from: {', '.join(PRESETS)}")
    run_train_bench(presets=presets, dtypes=dtype or ["fp32", "bf16"], batch_size=batch_size, seq_len=seq_len,
                    steps=steps, threads=threads, out_md=out, log=typer.echo, tune_malloc=tune_malloc)


# ---- `seekformer bench serve` (serving engineer; the command lives in cli/serve.py, the benchmark in bench/serve.py)
from .serve import bench_serve_cmd  # noqa: E402

bench_app.command("serve")(bench_serve_cmd)
# ---- end of `bench serve`


# ---- `seekformer bench decode` (inference engineer; the command lives in cli/generate.py, the benchmark in bench/decode.py)
from .generate import bench_decode_cmd  # noqa: E402

bench_app.command("decode")(bench_decode_cmd)
# ---- end of `bench decode`


# ---- `seekformer bench compress` (compress worker; the command lives in cli/compress.py)
from .compress import bench_compress_cmd  # noqa: E402

bench_app.command("compress")(bench_compress_cmd)
# ---- end of `bench compress`


@bench_app.command("distributed")
def distributed(
    preset: str = typer.Option("tiny", "--preset", help="Model preset."),
    steps: int = typer.Option(30, "--steps", help="Training steps per configuration."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(16, "--batch-size", help="Global batch (sequences per step)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads in all: 1 process x T, or P processes x T/P."),
    out: Path = typer.Option(Path("benchmarks/results/distributed.md"), "--out", help="Markdown table to write."),
) -> None:
    """Tokens/s of 1 process vs 2 processes (DDP, FSDP2, FSDP2 + expert parallel) on this machine, as ratios."""
    import sys

    from ..bench.distributed import run_distributed_bench, to_markdown
    from ..checkpoint import atomic_write_text

    res = run_distributed_bench(preset=preset, steps=steps, seq_len=seq_len, batch_size=batch_size, threads=threads)
    md = to_markdown(res, "seekformer bench " + " ".join(sys.argv[sys.argv.index("distributed"):]))
    typer.echo(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, md)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
