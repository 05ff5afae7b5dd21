"""`seekformer serve MODEL_DIR`: an OpenAI-compatible HTTP server (see seekformer.serving)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SeekformerError


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model_dir: Path = typer.Argument(..., help="A model directory with its tokenizer "
                                         "(e.g. seekformer-quickstart)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SEEKFORMER_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on /v1 routes."),
        model_name: Optional[str] = typer.Option(None, "--model-name",
                                                 help="Name clients pass as 'model' (default: the folder name)."),
        max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Sequences decoded together."),
        max_queue: int = typer.Option(256, "--max-queue", min=0,
                                      help="Sequences that may wait for a slot; beyond that requests get 429."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (default) or bfloat16."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image_url "
                                                 "parts (default: only inline data: URLs; remote ones get a 400)."),
    ) -> None:
        """Serve a model over HTTP with the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models).

        Talk to it with any OpenAI client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "-").
        GET /health and GET /metrics (Prometheus) are open. Ctrl-C finishes in-flight requests, then exits.
        """
        from ..runtime import prefer_passive_openmp

        prefer_passive_openmp()  # before torch loads
        try:
            from ..serving.server import serve
        except ImportError as e:
            raise SeekformerError(f"serving needs the 'serve' extra ({e.name} is missing): "
                                  "pip install 'seekformer[serve]'") from None
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if api_key is not None and not api_key.strip():
            raise SeekformerError("--api-key is empty: give a key, or leave the option out for no authentication")
        serve(model_dir, host=host, port=port, api_key=api_key, model_name=model_name, max_batch_size=max_batch_size,
              max_queue=max_queue, device=device, dtype=dtype, log_level=log_level,
              allow_remote_images=allow_remote_images)


def bench_serve_cmd(
    model_dir: Optional[Path] = typer.Argument(None, help="Model directory (default: ./seekformer-quickstart if it "
                                               "exists, else a random `tiny`-preset model)."),
    clients: Optional[list[int]] = typer.Option(None, "--clients", help="Concurrency levels (repeatable; "
                                                "default 1, 4, 16)."),
    requests: int = typer.Option(4, "--requests", min=1, help="Requests per client at each level."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens generated per request."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the server."),
    url: Optional[str] = typer.Option(None, "--url", help="Measure a running server instead (model name: "
                                      "--model-name)."),
    model_name: str = typer.Option("bench", "--model-name", help="Model name of the server at --url."),
    out: Path = typer.Option(Path("benchmarks/results/serve.md"), "--out", help="Markdown table to write."),
) -> None:
    """Serving throughput: aggregate tokens/s and p50/p95 latency with 1, 4 and 16 concurrent clients."""
    from ..runtime import prefer_passive_openmp

    if url is None:
        prefer_passive_openmp()  # inherited by the server subprocess: it runs as `seekformer serve` does
    from ..bench.serve import markdown, run_serve_bench, write_markdown

    levels = tuple(sorted(set(clients or [1, 4, 16])))
    if levels[0] < 1:
        raise SeekformerError("--clients must be >= 1")
    rows, info = run_serve_bench(model_dir, levels, requests, max_tokens, threads, url, model_name)
    typer.echo(markdown(rows, info))
    typer.echo(f"written to {write_markdown(rows, info, out)}", err=True)

