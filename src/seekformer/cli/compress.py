"""`seekformer compress quantize|prune|distill` and `seekformer bench compress` (see docs/compress.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

compress_app = typer.Typer(no_args_is_help=True, help="Smaller, faster models: quantize, prune experts, distill.")


@compress_app.command("quantize")
def quantize_cmd(
    model_dir: Path = typer.Argument(..., help="Float model directory (config.json, safetensors, tokenizer)."),
    bits: int = typer.Option(..., "--bits", help="8 (int8 per output channel) or 4 (int4 per group)."),
    group_size: int = typer.Option(64, "--group-size", help="int4: inputs per scale/minimum (multiple of 32)."),
    out: Path = typer.Option(..., "--out", help="Directory for the quantized model."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Quantize the token embedding (int8 rows)."),
    lm_head: bool = typer.Option(True, "--lm-head/--no-lm-head", help="Quantize the output head."),
) -> None:
    """Weight-only int8/int4 quantization; the output loads in every verb (generate, chat, eval, serve, bench)."""
    from ..compress.quantize import dir_size, quantize_dir

    path = quantize_dir(model_dir, out, bits, group_size, embeddings=embeddings, lm_head=lm_head)
    typer.echo(f"wrote {path} (int{bits}; weights {dir_size(path) / 2**20:.1f} MiB, "
               f"from {dir_size(model_dir) / 2**20:.1f} MiB)")


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress")
