"""`st-sdk backends`: which backends exist here, which would run a model, and why."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "backends", help="list backends and plugins, explain (and measure) the choice for a model",
        description="Probe every backend plugin on this machine and explain which one a model would use. "
                    "With MODEL (or --preset), --measure times real decode steps of that model on the top "
                    "candidates, validates them against the NumPy reference and caches the timings, so "
                    "later loads pick the fastest without measuring.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="a .gguf file or HF directory")
    p.add_argument("--preset", help="a synthetic model shape instead of MODEL: tiny, 4b-a0.6b, 21b-a3b")
    p.add_argument("--format", default="f32", help="weight format of the --preset model (default f32)")
    p.add_argument("--backend", default="auto", help="what to request: auto, a name, or a comma priority list")
    p.add_argument("--threads", type=int, default=None, help="threads each backend is created with")
    p.add_argument("--dtype", default=None, help="compute dtype requested from each backend")
    p.add_argument("--measure", action="store_true", help="measure decode speed (unless a cached measurement fits)")
    p.add_argument("--remeasure", action="store_true", help="measure even when a cached measurement fits")
    p.add_argument("--gpus", action="store_true", help="also import torch/jax to list the GPUs they see")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--clear-cache", action="store_true", help="delete the measured-selection cache and exit")
    p.set_defaults(func=run)


def _model_inputs(args):
    """(config, params, weight format) of MODEL or --preset, or Nones."""
    if args.model and args.preset:
        from st_sdk.errors import InputError

        raise InputError("give MODEL or --preset, not both")
    if args.model:
        from st_sdk.loader import weight_format
        from st_sdk.weights import open_model

        mf = open_model(args.model)
        params = mf.params()
        return mf.config, params, weight_format(params)
    if args.preset:
        from st_sdk.synth import preset_config, random_params

        cfg = preset_config(args.preset)
        return cfg, random_params(cfg, fmt=args.format), args.format
    return None, None, args.format


def run(args: argparse.Namespace) -> int:
    from st_sdk import selection_cache

    if args.clear_cache:
        had = selection_cache.clear()
        print(f"{'removed' if had else 'no cache at'} {selection_cache.cache_path()}")
        return 0
    from st_sdk.hardware import probe_gpus
    from st_sdk.registry import get_registry
    from st_sdk.selection import select_backend

    config, params, fmt = _model_inputs(args)
    _, sel = select_backend(args.backend, config=config, params=params, dtype=args.dtype, n_threads=args.threads,
                            tune=args.measure or args.remeasure, remeasure=args.remeasure, weight_format=fmt)
    if args.gpus:
        sel.hardware = probe_gpus(sel.hardware, import_frameworks=True)
    registry = get_registry()
    if args.json:
        doc = sel.to_dict()
        doc["plugins"] = [p.to_dict() for p in registry.plugins]
        doc["model"] = args.model or (f"<preset {args.preset}>" if args.preset else None)
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(sel.explain())
    print("plugins:")
    for p in registry.plugins:
        state = f"error: {p.error}" if p.error else f"backends: {', '.join(p.backends) or '-'}"
        print(f"  {p.name:10s} {p.source:32s} {state}")
    return 0
