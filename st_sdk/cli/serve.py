"""`st-sdk serve MODEL`: an OpenAI-compatible HTTP server (st_sdk.serving) on 127.0.0.1 by default."""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONTEXT = 4096


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL on /v1/chat/completions, /v1/completions and /v1/models (plain or streamed), "
                    "with /health and Prometheus /metrics. Requests run together in one batch per step "
                    "(continuous batching). Needs the [serve] extra (fastapi, uvicorn, sse-starlette).")
    p.add_argument("model", metavar="MODEL", help="a .gguf file or an HF model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--parallel", type=int, default=8, metavar="N",
                   help="sequences decoded together; more requests wait in the queue (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests allowed to wait; beyond that the server answers 503 (default 64)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help=f"tokens per sequence, prompt included (default min(model context, {DEFAULT_CONTEXT}))")
    p.add_argument("--api-key", default=os.environ.get("ST_SDK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $ST_SDK_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the file's name)")
    p.add_argument("--backend", default="auto", help="auto (default), a backend name, or a comma priority list")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="run within this memory budget (e.g. 1GiB), planned for --parallel sequences of "
                        "--context tokens")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi, sse_starlette, uvicorn  # noqa: F401,E401
    except ImportError as e:
        print(f"st-sdk serve needs the [serve] extra ({e.name} is missing): pip install 'st-sdk[serve]'",
              file=sys.stderr)
        return 1
    import st_sdk
    from st_sdk.errors import InputError
    from st_sdk.serving import serve

    for name in ("parallel", "port", "context", "max_queue"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name != "max_queue")):
            raise InputError(f"--{name.replace('_', '-')}: must be positive, got {v}")
    backend = args.backend.split(",") if "," in args.backend else args.backend
    from st_sdk.context import resolve_context
    from st_sdk.weights import open_model

    cfg = open_model(args.model).config   # to size the context before loading
    context = resolve_context(cfg, min(args.context or DEFAULT_CONTEXT, cfg.max_position_embeddings))
    # under a budget the memory plan holds the KV caches of every parallel sequence
    planned = min(context * args.parallel, cfg.max_position_embeddings) if args.max_memory else context
    extra = {"max_memory": args.max_memory} if args.max_memory else {}
    model = st_sdk.load(args.model, backend=backend, n_threads=args.threads, context=planned, **extra)
    model.context = context                 # tokens per sequence, prompt included
    kv = args.parallel * cfg.kv_cache_bytes(context)
    if model.memory_plan is not None:
        kv = min(kv, model.memory_plan.kv_bytes)
    model.engine.configure(max_batch=args.parallel, max_queue=args.max_queue, max_kv_bytes=kv)
    print(f"st-sdk serve: {model.path} on {model.backend.name}, {args.parallel} parallel sequences of up to "
          f"{context} tokens, http://{args.host}:{args.port}/v1", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("st-sdk serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    serve(model, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
          log_level=args.log_level)
    return 0
