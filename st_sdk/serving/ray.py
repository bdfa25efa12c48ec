"""The OpenAI-compatible app on Ray Serve: N replicas, each holding one model with its own engine
(scheduler, batch, queue, KV budget), behind Ray Serve's HTTP proxy, which spreads requests over them.
Routes, errors and streaming are those of `create_app` (st_sdk/serving/app.py): each replica serves
that very app, built in the replica once its model is loaded.

    from ray import serve
    from st_sdk.serving.ray import deployment

    serve.run(deployment("model.gguf", num_replicas=2, n_threads=1), route_prefix="/")

`st-sdk serve MODEL --ray` does this for a local Ray instance or a running cluster (`connect`, `run`). Needs the
`[ray]` extra (Ray Serve); see docs/serving.md.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import STError

INSTALL = 'pip install "st-sdk[ray]"'
#: the application's name in Ray Serve (`serve status`, `serve.delete`)
APP_NAME = "st-sdk"


class RayMissing(STError, ImportError):
    """Ray Serve is not installed."""


def require_ray():
    """`ray.serve`, or RayMissing saying how to install it."""
    try:
        from ray import serve
    except ImportError as e:
        raise RayMissing(f"serving on Ray needs Ray Serve ({e.name} is missing): {INSTALL}") from None
    return serve


def deployment(model_path, *, model_name: str | None = None, api_key: str | None = None, parallel: int = 8,
               max_queue: int = 64, context: int | None = None, num_replicas: int | str | None = None,
               autoscaling_config: dict | None = None, ray_actor_options: dict | None = None,
               name: str = "st-sdk", options: dict | None = None, **load_kwargs):
    """A bound Ray Serve deployment (give it to `serve.run`, or compose it) whose replicas each load
    `model_path` through `st_sdk.serving.load_model(model_path, parallel, max_queue, context,
    **load_kwargs)` (load_kwargs: `backend`, `n_threads`, `max_memory`... as `st_sdk.load` takes them)
    and serve the OpenAI-compatible app on it.

    num_replicas (default 1) or autoscaling_config (Ray Serve's dict: min_replicas, max_replicas,
    target_ongoing_requests...): how many replicas. ray_actor_options: each replica's resources; by
    default `num_cpus` is `n_threads` (1 when not given: then give n_threads, or each replica's
    backend uses every core of its node) and, under `max_memory`, `memory` is that budget, so Ray places
    replicas where their threads and memory fit. Each replica takes up to parallel + max_queue requests
    at once (`max_ongoing_requests`); its own queue answers 503 beyond that. `options`: any other
    `serve.deployment` option, passed through.
    """
    serve = require_ray()
    from ..arguments import positive_int
    from ..sizes import parse_size

    positive_int(parallel, "parallel", allow_none=False)
    path = os.fspath(model_path)
    spec = dict(parallel=parallel, max_queue=max_queue, context=context, **load_kwargs)
    served_name = model_name or Path(path).name

    def build_app():   # runs in each replica
        from st_sdk.serving import create_app, load_model

        return create_app(load_model(path, **spec), model_name=served_name, api_key=api_key)

    @serve.ingress(build_app)
    class Replica:
        """One model and its engine; the app is built by `build_app` when the replica starts."""

    actor = {"num_cpus": load_kwargs.get("n_threads") or 1}
    if load_kwargs.get("max_memory"):
        actor["memory"] = parse_size(load_kwargs["max_memory"])
    actor.update(ray_actor_options or {})
    opts = {"name": name, "ray_actor_options": actor, "max_ongoing_requests": parallel + max_queue}
    if autoscaling_config is not None:
        opts["autoscaling_config"] = autoscaling_config
    else:
        opts["num_replicas"] = 1 if num_replicas is None else num_replicas
    opts.update(options or {})
    return serve.deployment(Replica, **opts).bind()


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to the Ray cluster at `address`, or start a local Ray instance with
    `num_cpus` CPUs whose workers import the st_sdk this process runs. Returns whether it started a
    local instance (give that to `stop`). Ray installs its own SIGINT/SIGTERM handlers here: install
    yours after."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, configure_logging=False)
        return False
    src = str(Path(__file__).resolve().parents[2])   # the directory holding this st_sdk package
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Start Serve's HTTP proxy on host:port (unless Serve already runs on the cluster: then its proxy
    stays as it is) and run `app` at "/" as APP_NAME, waiting until its replicas are up. log_level:
    Serve's (controller, proxy, replicas)."""
    serve = require_ray()
    logs = {"log_level": log_level.upper()}
    serve.start(http_options={"host": host, "port": port}, logging_config=logs)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logs)


def stop(local: bool) -> None:
    """Delete the application and disconnect; shut Serve and Ray down too when `connect` started a
    local instance (a cluster keeps running)."""
    serve = require_ray()
    import ray

    if local:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()
