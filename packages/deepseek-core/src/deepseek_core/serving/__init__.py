"""The OpenAI-compatible HTTP server over the engine (install the `serve` extra: fastapi, uvicorn,
prometheus-client).

    from deepseek_core.engine import AsyncLLM
    from deepseek_core.serving import create_app
    app = create_app(AsyncLLM("model-dir"), served_model_name="my-model", api_keys=["secret"])
"""

from __future__ import annotations

from typing import Any

__all__ = ["AuditLog", "create_app", "run_server"]


def __getattr__(name: str) -> Any:
    # Lazy: `import deepseek_core.serving` must not pull FastAPI in before it is needed.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run_server":
        from .server import run_server

        return run_server
    if name == "AuditLog":
        from .audit import AuditLog

        return AuditLog
    raise AttributeError(f"module 'deepseek_core.serving' has no attribute {name!r}")
