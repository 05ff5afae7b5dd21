"""Running the app: load a model directory, serve it with uvicorn (in the foreground or in a thread).

    serve("seekformer-quickstart", port=8000)                 # blocks; Ctrl-C / SIGTERM shut down gracefully
    with ServerThread(app) as srv:                           # tests and benchmarks: a live server on a free port
        openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import SeekformerError
from .limits import DEFAULT_MAX_BODY_BYTES

SERVE_EXTRA_HINT = 'pip install -e ".[serve]" (from a clone; or pip install "seekformer[serve]")'


def load_model_dir(model_dir: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
                   adapter: str | os.PathLike | None = None):
    """(model, tokenizer) of a model directory (`seekformer.models.loading.load_model_and_tokenizer`), with a
    peft LoRA `adapter` folded in when given."""
    from ..models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, device, dtype)
    if adapter is not None:
        from ..models.multitask import apply_adapter

        model = apply_adapter(model, adapter).eval()
    return model, tok


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app, host: str, port: int, log_level: str = "info"):
    """The uvicorn.Config every server uses: on shutdown it waits for open responses to finish."""
    import uvicorn

    # timeout_graceful_shutdown=None: on shutdown, wait for every open response to finish
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                          lifespan="on")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), as uvicorn would open it; SeekformerError (one line) when the
    address is taken or cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = "is already in use (another server?): stop it or choose another --port" \
            if e.errno in (98, 48, 10048) else f"cannot be used: {e.strerror or e}"
        raise SeekformerError(f"cannot serve on {host}:{port}: the address {reason}") from None
    sock.set_inheritable(True)
    return sock


def require_serve_extra() -> None:
    """SeekformerError naming the install command when the `serve` extra's packages are missing."""
    import importlib

    for name in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise SeekformerError(f"serving needs the 'serve' extra ({name} is not installed): "
                                  f"{SERVE_EXTRA_HINT}") from None


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch_size: int = 16, max_queue: int = 256, device: str = "cpu",
          dtype: str | None = None, log_level: str = "info", max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
          cors_origins: list[str] | None = None, prefill_chunk: int = 512,
          lora: tuple[str, str] | None = None, allow_remote_images: bool = False,
          speculative: bool | None = None, speculative_tokens: int | None = None) -> None:
    """Load `model_dir` and serve it until interrupted (SIGINT/SIGTERM finish in-flight requests first).

    `max_body_bytes` None: no body limit; `lora` (NAME, DIR) folds a peft adapter in and serves it as NAME;
    `allow_remote_images` lets image_url parts fetch http(s) URLs (a model with a vision tower);
    `speculative` and `speculative_tokens` as ServerConfig takes them (MTP self-speculative decoding).
    Raises SeekformerError (one line) without the `serve` extra or when (host, port) is taken; the port is
    bound before the model loads and before "serving ..." is printed."""
    require_serve_extra()
    import uvicorn

    from .app import ServerConfig, create_app

    sock = bind_socket(host, port)
    try:
        from .vision import VisionOptions, load_server_vision

        model, tok = load_model_dir(model_dir, device, dtype, adapter=lora[1] if lora else None)
        name = model_name or (lora[0] if lora else Path(model_dir).resolve().name)
        config = ServerConfig(model_name=name, api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue,
                              max_body_bytes=max_body_bytes,
                              cors_origins=list(cors_origins or []), prefill_chunk=prefill_chunk,
                              speculative=speculative, speculative_tokens=speculative_tokens,
                              vision=load_server_vision(model, model_dir),
                              vision_options=VisionOptions(allow_remote_images=allow_remote_images))
        app = create_app(model, tok, config)
        logging.getLogger(__name__).info(f"serving {model_dir} as model '{name}' on http://{host}:{port}/v1"
                                         + (" (API key required)" if api_key else ""))
        uvicorn.Server(uvicorn_config(app, host, port, log_level)).run(sockets=[sock])
    finally:
        sock.close()


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
        """http://HOST:PORT of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        """Start serving in the thread; returns once the server accepts connections (RuntimeError after
        `timeout` seconds)."""
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
