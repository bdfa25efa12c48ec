"""An OpenAI-compatible server over a model's engine (`st-sdk serve`, or `create_app` for a deployment
that wraps the app itself), and its replicas on Ray Serve (`st_sdk.serving.ray`, `st-sdk serve --ray`).
Needs the `[serve]` extra: fastapi, uvicorn, sse-starlette; Ray needs the `[ray]` extra.
See docs/serving.md."""
from __future__ import annotations

#: tokens per sequence when neither the caller nor a smaller model context says otherwise
DEFAULT_CONTEXT = 4096


def load_model(path, parallel: int = 8, max_queue: int = 64, context: int | None = None,
               max_memory=None, **load_kwargs):
    """The model a server holds: `st_sdk.load(path, **load_kwargs)` with `context` tokens per sequence
    (default min(model context, DEFAULT_CONTEXT)) and its engine configured for `parallel` sequences at
    once, `max_queue` waiting, and their KV caches. Under `max_memory` the memory plan holds the KV
    caches of every parallel sequence. `st-sdk serve` and each Ray Serve replica load through this."""
    import st_sdk
    from st_sdk.context import resolve_context
    from st_sdk.weights import open_model

    cfg = open_model(path).config   # to size the context before loading
    context = resolve_context(cfg, min(context or DEFAULT_CONTEXT, cfg.max_position_embeddings))
    planned = min(context * parallel, cfg.max_position_embeddings) if max_memory else context
    extra = {"max_memory": max_memory} if max_memory else {}
    model = st_sdk.load(path, context=planned, **extra, **load_kwargs)
    model.context = context                 # tokens per sequence, prompt included
    kv = parallel * cfg.kv_cache_bytes(context)
    if model.memory_plan is not None:
        kv = min(kv, model.memory_plan.kv_bytes)
    model.engine.configure(max_batch=parallel, max_queue=max_queue, max_kv_bytes=kv)
    return model


def create_app(target, model_name: str | None = None, api_key: str | None = None):
    """The FastAPI app serving `target` (a Model or its Engine); see st_sdk.serving.app."""
    from .app import create_app as make

    return make(target, model_name=model_name, api_key=api_key)


def serve(target, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """Serve `target` with uvicorn on host:port until interrupted."""
    from .app import serve as run

    run(target, host=host, port=port, **kw)


__all__ = ["create_app", "load_model", "serve"]
