"""An OpenAI-compatible server over a model's engine (`st-sdk serve`, or `create_app` for a deployment
that wraps the app itself, such as Ray Serve). Needs the `[serve]` extra: fastapi, uvicorn, sse-starlette.
See docs/serving.md."""
from __future__ import annotations


def create_app(target, model_name: str | None = None, api_key: str | None = None):
    """The FastAPI app serving `target` (a Model or its Engine); see st_sdk.serving.app."""
    from .app import create_app as make

    return make(target, model_name=model_name, api_key=api_key)


def serve(target, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """Serve `target` with uvicorn on host:port until interrupted."""
    from .app import serve as run

    run(target, host=host, port=port, **kw)


__all__ = ["create_app", "serve"]
