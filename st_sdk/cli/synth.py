"""`st-sdk synth OUT`: write a random-weight SmallThinker (HF directory and/or GGUF) to try things on."""
from __future__ import annotations


def add_parser(sub) -> None:
    from st_sdk.weights.tensor import QUANTIZABLE

    p = sub.add_parser("synth", help="write a synthetic (random-weight) model: HF directory and/or GGUF",
                       description="Write a SmallThinker with random weights and the real shapes: an HF "
                                   "directory at OUT and/or OUT/<preset>-<dtype>.gguf (same weights in both).")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--preset", default="tiny", help="tiny | 4b-a0.6b | 21b-a3b (default tiny)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--format", default="hf,gguf", help="comma list of hf, gguf (default both)")
    p.add_argument("--dtype", default="f32", choices=list(QUANTIZABLE),
                   help="weight type of the matrices (norms and router stay f32); quantised types are GGUF-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="split the safetensors into N shards with an index")
    p.add_argument("--routing-skew", type=float, default=0.0, metavar="S",
                   help="realistic routing for expert caching: a quarter of each layer's experts fire "
                        "often, the rest rarely (S = 1 sends most picks to that quarter; default 0: no added skew)")
    p.add_argument("--routing", default=None, metavar="NAME[:PARAM]",
                   help="how tokens spread over experts: 'uniform' (every expert of a layer equally often: "
                        "the worst case for an expert cache); 'skewed[:S]' (the r-th most popular expert "
                        "gets a share proportional to 1/r**S, default S=1); 'trained' (per layer, the expert "
                        "shares and ReGLU zero fraction measured on the shipped trained model); "
                        "'trained:STATS.json' (those of `st-sdk perplexity MODEL TEXT --routing-stats "
                        "STATS.json`). Routing then depends on the token alone. Default: plain random weights")
    p.set_defaults(func=run)


def run(args) -> int:
    from st_sdk.synth import write_model

    paths = write_model(args.out, preset=args.preset, layers=args.layers, formats=args.format,
                        dtype=args.dtype, seed=args.seed, shards=args.shards,
                        routing_skew=args.routing_skew, routing=args.routing)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
