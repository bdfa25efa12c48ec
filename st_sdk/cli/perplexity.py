"""`st-sdk perplexity MODEL TEXT`: perplexity on a text file and, with --kl-divergence BASE, how far the
model's predictions are from a base model's (mean and 99th-percentile KL divergence, top-1 agreement)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "perplexity", help="perplexity on a text, and KL divergence against a base model",
        description="Perplexity of MODEL on the text file TEXT, cut into chunks of --context tokens (each a fresh "
                    "sequence; every token after a chunk's first is scored). With --kl-divergence BASE, also the "
                    "KL divergence KL(base || model) of the next-token distributions (mean, median, 99th "
                    "percentile, max) and how often both models' most likely token agree: how a quantised file "
                    "compares with its original. MODEL or BASE 'demo' is the model shipped with st-sdk, TEXT "
                    "'demo' its held-out evaluation text.")
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf file, or 'demo'")
    p.add_argument("text", metavar="TEXT", help="a UTF-8 text file, or 'demo'")
    p.add_argument("--kl-divergence", metavar="BASE_MODEL", default=None,
                   help="base model (same vocabulary) to compare the predictions with, e.g. the F32 file")
    p.add_argument("--backend", default="auto", help="auto (default), a backend name, or a comma priority list "
                                                     "(the base model runs on the same)")
    p.add_argument("--dtype", default=None, help="compute dtype of torch/jax (float32, bfloat16)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per chunk (default: min(max_position_embeddings, 512))")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="use only the first N tokens of TEXT")
    p.add_argument("--routing-stats", metavar="OUT.json", default=None,
                   help="also record how often each expert is chosen and the ReGLU zero fraction per layer, "
                        "and write them to OUT.json (what `st-sdk synth --routing trained:OUT.json` reads)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys
    from contextlib import nullcontext
    from pathlib import Path

    import st_sdk
    from st_sdk.data import resolve_model, resolve_text
    from st_sdk.errors import InputError
    from st_sdk.perplexity import perplexity

    text_path = Path(resolve_text(args.text))
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{text_path}: text file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise InputError(f"{text_path}: not a UTF-8 text file ({type(e).__name__})") from None
    if args.max_tokens is not None and args.max_tokens < 2:
        raise InputError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    backend = args.backend.split(",") if "," in args.backend else args.backend
    model = st_sdk.load(resolve_model(args.model), backend=backend, dtype=args.dtype)
    base = None
    if args.kl_divergence is not None:
        # on the backend the model got, so the comparison measures the weights, not two backends
        base = st_sdk.load(resolve_model(args.kl_divergence), backend=model.backend.name, dtype=args.dtype)
    if model.tokenizer is None:
        raise InputError(f"{model.path}: the model file carries no tokenizer, so TEXT cannot be encoded")
    ids = model.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]

    recorder = None
    if args.routing_stats:
        from st_sdk.routing import RoutingRecorder

        recorder = RoutingRecorder(model)
    with recorder or nullcontext():
        res = perplexity(model, ids, context=args.context, base=base, progress=True)
    from st_sdk.loader import weight_format

    fmt = weight_format(model.params)
    out = {"model": str(model.path), "text": str(text_path), "backend": model.backend.name, "weight_format": fmt,
           **res.to_dict()}
    if base is not None:
        out["kl_divergence"] = {"base": str(base.path), **out["kl_divergence"]}
    if recorder is not None:
        stats = recorder.stats(source=f"{model.path} on {text_path.name}", context=res.context,
                               backend=model.backend.name)
        stats.save(args.routing_stats)
        out["routing_stats"] = str(args.routing_stats)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"model: {model.path} (backend {model.backend.name}, {fmt})")
    print(f"text: {text_path}: {res.tokens} tokens in {res.chunks} chunk(s) of up to {res.context}; "
          f"{res.scored} scored")
    print(f"perplexity: {res.perplexity:.4f} (mean NLL {res.nll:.4f} nats/token; a uniform guess over the "
          f"{res.vocab_size}-token vocabulary scores {res.vocab_size})")
    if res.kl is not None:
        k = res.kl
        print(f"KL divergence from {base.path}: mean {k.mean:.6f}, median {k.median:.6f}, 99th percentile "
              f"{k.p99:.6f}, max {k.max:.6f} nats/token; top-1 agreement {100 * k.top1_agreement:.2f}%; "
              f"base perplexity {k.base_perplexity:.4f}")
    if recorder is not None:
        print(f"routing statistics: {args.routing_stats}")
        print(stats.table())
    sys.stdout.flush()
    return 0
