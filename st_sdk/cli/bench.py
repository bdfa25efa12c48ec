"""`st-sdk bench`: which backend is fastest here, and by how much (optionally against llama.cpp)."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="compare backends and weight formats (prefill, decode, peak memory, vs llama.cpp)",
        description="Time prefill and decode for every backend and weight format, each in its own process "
                    "(peak RSS measured), interleaved round by round. With no MODEL a synthetic model is "
                    "written once into the cache directory (or built in memory).")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a .gguf file or HF directory (default: synthesise --preset)")
    p.add_argument("--backend", default="all", help="'all' or a comma list of backends (default: all)")
    p.add_argument("--preset", default="tiny", help="synthetic model shape when no MODEL: tiny, 4b-a0.6b, 21b-a3b")
    p.add_argument("--format", default=None,
                   help="comma list of weight formats for the synthetic model (default: q4_0,q8_0,f16); "
                        "llama.cpp's mixes (q4_k_m, q6_k, q3_k_m, ...) are quantised from the F16 file")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for prefill (default 128)")
    p.add_argument("--gen-len", type=int, default=32, help="decoded tokens per round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per case, interleaved (default 3)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--vs-llama-cpp", action="store_true", help="run llama.cpp on the same GGUF file, interleaved")
    p.add_argument("--max-workers", type=int, default=0,
                   help="backends of one format loaded at once (default: all for small models, 1 above 1 GiB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="run st-sdk backends within this memory budget (e.g. 1GiB) and report the expert cache")
    p.add_argument("--json", action="store_true", help="print one JSON document (records per backend and format)")
    p.add_argument("--plot", metavar="FILE.png", help='also draw a bar chart (needs matplotlib: pip install -e ".[plot]")')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from st_sdk import bench
    from st_sdk.errors import InputError
    from st_sdk.weights.mixes import MIXES
    from st_sdk.weights.tensor import FORMATS

    for flag in ("prompt_len", "gen_len", "rounds"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    formats = tuple(f.strip().lower() for f in args.format.split(",")) if args.format else bench.DEFAULT_FORMATS
    known = tuple(dict.fromkeys(FORMATS + tuple(MIXES)))
    bad = [f for f in formats if f not in known]
    if bad:
        raise InputError(f"--format: unknown format(s) {', '.join(bad)}; choose from {', '.join(known)}")
    if args.plot:   # fail before a long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError('--plot needs matplotlib: pip install -e ".[plot]" (from a clone of st-sdk)') from None
    backends = None if args.backend in ("all", "") else [b.strip() for b in args.backend.split(",") if b.strip()]
    opts = bench.BenchOptions(backends=backends, model=args.model, preset=args.preset, formats=formats,
                              prompt_len=args.prompt_len, gen_len=args.gen_len, rounds=args.rounds,
                              threads=args.threads, vs_llama_cpp=args.vs_llama_cpp, max_workers=args.max_workers,
                              seed=args.seed, max_memory=args.max_memory)
    if not args.model:
        from st_sdk.synth import preset_config

        preset_config(args.preset)   # an unknown preset fails here, naming the choices
    records, context = bench.run_bench(opts, progress=not args.json or sys.stderr.isatty())
    if args.json:
        print(bench.to_json(records, context))
    else:
        print(bench.format_table(records, context))
    if args.plot:
        c = context["config"]
        bench.plot(records, args.plot, f"{c['model']}, {c['threads']} threads, {c['prompt_len']}-token prompt")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if any(r.status == "ok" for r in records) else 1
