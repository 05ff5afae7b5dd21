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
        compile: bool = typer.Option(False, "--compile/--no-compile", help="Compile the decoding step with "
                                     "torch.compile (one-off compilation at the first steps, cached on disk; eager "
                                     "fallback with a warning)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        max_body_bytes: int = typer.Option(8 * 2 ** 20, "--max-body-bytes", min=0,
                                           help="Larger request bodies get 413 before parsing (0: no limit)."),
        cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="Let browsers on this origin "
                                                        "call the API (repeatable; '*' for any)."),
        prefill_chunk: int = typer.Option(512, "--prefill-chunk", min=16, help="Prompt tokens encoded between "
                                          "two decode steps (long prompts and scoring go in chunks)."),
        lora: Optional[str] = typer.Option(None, "--lora", help="NAME=DIR: serve MODEL_DIR with the peft LoRA "
                                           "adapter in DIR folded in, as model NAME."),
        allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image_url "
                                                 "parts (default: only inline data: URLs; remote ones get a 400)."),
        speculative: Optional[bool] = typer.Option(None, "--speculative/--no-speculative", help="MTP "
                                                   "self-speculative decoding (greedy: the same tokens; sampled: "
                                                   "speculative sampling): on for every request, or off (default: for requests that send "
                                                   "\"speculative\": true, when the model has MTP modules)."),
        speculative_tokens: Optional[int] = typer.Option(None, "--speculative-tokens", min=1, max=7,
                                                         help="Drafts per speculative step (default: the MTP "
                                                         "depth; more chain the last MTP module)."),
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
                                  'pip install -e ".[serve]"') from None
        from . import options as opts

        opts.set_threads(threads)  # without --threads: few-row decode steps measure their thread count
        opts.set_compile(compile)
        if api_key is not None and not api_key.strip():
            raise SeekformerError("--api-key is empty: give a key, or leave the option out for no authentication")
        adapter = None
        if lora is not None:
            name, sep, path = lora.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise SeekformerError(f"--lora takes NAME=DIR (a model name and an adapter directory), got {lora!r}")
            adapter = (name.strip(), path.strip())
        serve(model_dir, host=host, port=port, api_key=api_key, model_name=model_name, max_batch_size=max_batch_size,
              max_queue=max_queue, device=device, dtype=dtype, log_level=log_level,
              max_body_bytes=max_body_bytes or None, cors_origins=cors_origin, prefill_chunk=prefill_chunk,
              lora=adapter, allow_remote_images=allow_remote_images, speculative=speculative,
              speculative_tokens=speculative_tokens)
