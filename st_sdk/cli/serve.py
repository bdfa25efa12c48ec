"""`st-sdk serve MODEL`: an OpenAI-compatible HTTP server (st_sdk.serving) on 127.0.0.1 by default;
with --ray, the same API from N Ray Serve replicas (st_sdk.serving.ray)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from st_sdk.serving import DEFAULT_CONTEXT   # a constant: st_sdk.serving imports nothing heavy at module level


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
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores; with --ray, per replica: cores / --replicas)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="run within this memory budget (e.g. 1GiB), planned for --parallel sequences of "
                        "--context tokens (with --ray: per replica)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("Ray Serve (the [ray] extra)")
    r.add_argument("--ray", action="store_true",
                   help="serve from Ray Serve replicas, each with its own model, engine, --parallel, --max-queue, "
                        "--threads and --max-memory, behind Ray's HTTP proxy on --host:--port")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas with --ray (default 1)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join the Ray cluster at ADDR (e.g. 'auto', or HEAD_IP:6379, as `ray start` prints); "
                        "default: start a local Ray instance, stopped on exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi, sse_starlette, uvicorn  # noqa: F401,E401
    except ImportError as e:
        print(f"st-sdk serve needs the [serve] extra ({e.name} is missing): pip install 'st-sdk[serve]'",
              file=sys.stderr)
        return 1
    from st_sdk.errors import InputError

    for name in ("parallel", "port", "context", "max_queue", "replicas", "threads"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name != "max_queue")):
            raise InputError(f"--{name.replace('_', '-')}: must be positive, got {v}")
    backend = args.backend.split(",") if "," in args.backend else args.backend
    load = dict(parallel=args.parallel, max_queue=args.max_queue, context=args.context,
                max_memory=args.max_memory, backend=backend, n_threads=args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("st-sdk serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    if args.ray:
        return _run_on_ray(args, load)
    if args.replicas != 1 or args.ray_address:
        raise InputError("--replicas and --ray-address need --ray")
    from st_sdk.serving import load_model, serve

    model = load_model(args.model, **load)
    print(f"st-sdk serve: {model.path} on {model.backend.name}, {args.parallel} parallel sequences of up to "
          f"{model.context} tokens, http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(model, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
          log_level=args.log_level)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_on_ray(args: argparse.Namespace, load: dict) -> int:
    """N replicas on a local Ray instance or a cluster, until SIGINT or SIGTERM."""
    from st_sdk.hardware import probe
    from st_sdk.serving import ray as st_ray

    st_ray.require_ray()

    num_cpus = None
    if args.ray_address is None:   # a local instance: this machine's cores divided among the replicas
        cores = probe().physical_cores or os.cpu_count() or 1
        if load["n_threads"] is None:
            load["n_threads"] = max(1, cores // args.replicas)
        num_cpus = max(cores, args.replicas * load["n_threads"])
        if args.replicas * load["n_threads"] > cores:
            print(f"st-sdk serve: warning: {args.replicas} replicas x {load['n_threads']} threads on {cores} "
                  f"cores", file=sys.stderr)
    # a file or directory by its absolute path (on a cluster every node needs it there), else a Hub name
    path = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    app = st_ray.deployment(path, model_name=args.model_name or os.path.basename(args.model.rstrip("/")),
                            api_key=args.api_key, num_replicas=args.replicas, **load)
    where = f"the Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray instance"
    print(f"st-sdk serve: starting {args.replicas} replicas of {args.model} on {where}", file=sys.stderr)
    local = st_ray.connect(args.ray_address, num_cpus=num_cpus)
    for sig in (signal.SIGINT, signal.SIGTERM):   # after Ray's own handlers, so that ours run
        signal.signal(sig, _interrupt)
    try:
        st_ray.run(app, host=args.host, port=args.port, log_level=args.log_level)
        print(f"st-sdk serve: {args.replicas} replicas x {load['n_threads'] or 'all'} threads, {args.parallel} "
              f"parallel sequences each, http://{args.host}:{args.port}/v1", file=sys.stderr)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("st-sdk serve: stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)        # let the shutdown finish
        signal.signal(signal.SIGINT, signal.default_int_handler)
        st_ray.stop(local)
    return 0
