"""OpenAI-compatible HTTP serving: `seekformer serve MODEL_DIR`.

    from seekformer.serving import ServerConfig, create_app, serve
    serve("seekformer-quickstart", port=8000)

Needs the optional extra `seekformer[serve]` (fastapi, uvicorn, sse-starlette).
"""

from __future__ import annotations

from .app import ServerConfig, create_app
from .server import ServerThread, load_model_dir, serve

__all__ = ["ServerConfig", "ServerThread", "create_app", "load_model_dir", "serve"]
