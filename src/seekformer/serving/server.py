"""Running the app: load a model directory, serve it with uvicorn (in the foreground or in a thread).

    serve("seekformer-quickstart", port=8000)                 # blocks; Ctrl-C / SIGTERM shut down gracefully
    with ServerThread(app) as srv:                           # tests and benchmarks: a live server on a free port
        openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_model_dir(model_dir: str | os.PathLike, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) of a model directory; CheckpointError when it has no tokenizer."""
    from ..checkpoint import check_model_dir
    from ..models.causal_lm import SeekForCausalLM
    from ..tokenizer import TOKENIZER_FILE, SeekTokenizer

    path = check_model_dir(model_dir)
    if not (Path(path) / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{path} has no {TOKENIZER_FILE}: serve a directory saved with its tokenizer "
                              "(a training run's output, or save_model(..., extra_files=tokenizer.files()))")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    model = SeekForCausalLM.from_pretrained(path, device=device, dtype=DTYPES.get(dtype) if dtype else None)
    return model.eval(), SeekTokenizer.load(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app, host: str, port: int, log_level: str = "info"):
    import uvicorn

    # timeout_graceful_shutdown=None: on shutdown, wait for every open response to finish
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                          lifespan="on")


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch_size: int = 16, max_queue: int = 256, device: str = "cpu",
          dtype: str | None = None, log_level: str = "info", allow_remote_images: bool = False) -> None:
    """Load `model_dir` and serve it until interrupted (SIGINT/SIGTERM finish in-flight requests first)."""
    import uvicorn

    from .app import ServerConfig, create_app

    model, tok = load_model_dir(model_dir, device, dtype)
    name = model_name or Path(model_dir).resolve().name
    print(f"serving {model_dir} as model '{name}' on http://{host}:{port}/v1"
          + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    from .vision import VisionOptions, load_server_vision

    app = create_app(model, tok, ServerConfig(model_name=name, api_key=api_key, max_batch_size=max_batch_size,
                                              max_queue=max_queue, vision=load_server_vision(model, model_dir),
                                              vision_options=VisionOptions(allow_remote_images=allow_remote_images)))
    uvicorn.Server(uvicorn_config(app, host, port, log_level)).run()


class ServerThread:
    """uvicorn serving `app` in a background thread on 127.0.0.1 and a free port (a context manager)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning") -> None:
        import uvicorn

        self.app = app
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, log_level))
        self.server.install_signal_handlers = lambda: None  # not the main thread (older uvicorn)
        self.thread = threading.Thread(target=self.server.run, name="seekformer-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        """Graceful: stop accepting, let open responses finish, drain the backend."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
