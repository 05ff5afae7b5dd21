"""OpenAI-compatible HTTP serving: `seekformer serve MODEL_DIR`.

    from seekformer.serving import ServerConfig, create_app, serve
    serve("seekformer-quickstart", port=8000)

Needs the optional extra `seekformer[serve]` (fastapi, uvicorn, sse-starlette).
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: `seekformer.serving.server.load_model_dir` (used by `seekformer eval`) must not need fastapi.
_EXPORTS = {"ServerConfig": "app", "create_app": "app", "ServerThread": "server", "load_model_dir": "server",
            "serve": "server"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
