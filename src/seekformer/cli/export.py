"""`seekformer export gguf MODEL_DIR OUT.gguf [--type f32|f16|q8_0]` (see docs/compress.md)."""

from __future__ import annotations

from pathlib import Path

import typer

export_app = typer.Typer(no_args_is_help=True, help="Export a model to other runtimes (llama.cpp GGUF).")


@export_app.command("gguf")
def gguf_cmd(
    model_dir: Path = typer.Argument(..., help="Model directory (config.json, safetensors, tokenizer.json)."),
    out: Path = typer.Argument(..., help="GGUF file to write."),
    type_: str = typer.Option("f16", "--type", help="Tensor type: f32, f16 or q8_0."),
) -> None:
    """Write llama.cpp's `deepseek2` GGUF (MLA, shared + routed experts, sigmoid group routing, tokenizer)."""
    from ..compress.gguf import export_gguf

    path = export_gguf(model_dir, out, type_)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {type_})")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
