"""`st-sdk quantize IN OUT.gguf --type T`: convert an HF directory or GGUF to a GGUF llama.cpp loads,
with llama.cpp's per-tensor mixes (q4_k_m, q3_k_m, ...)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from st_sdk.weights.export import GGUF_FORMATS

    p = sub.add_parser("quantize", help="convert a model (HF directory or GGUF) to a GGUF of another type",
                       description="Write OUT.gguf with the matrices stored as --type. A llama.cpp mix "
                                   "(q4_k_m, q5_k_m, q3_k_m, q4_0, ...) gives each tensor the type "
                                   "llama-quantize would (the LM head q6_k, some layers' attn_v and ffn_down "
                                   "a higher type); --pure stores every matrix as the main type. Norms and "
                                   "the router stay f32 (a quantised router scrambles the top-k).")
    p.add_argument("input", metavar="IN", help="HF directory or .gguf file")
    p.add_argument("output", metavar="OUT.gguf")
    p.add_argument("--type", default="q8_0", choices=list(GGUF_FORMATS), metavar="TYPE",
                   help=f"one of {', '.join(GGUF_FORMATS)} (default q8_0)")
    p.add_argument("--pure", action="store_true", help="every matrix the main type (as llama-quantize --pure)")
    p.add_argument("--quantizer", default="st-sdk", choices=["st-sdk", "llama.cpp", "auto"],
                   help="whose quantiser rounds the weights: st-sdk's (default) or llama.cpp's "
                        "(llama-cpp-python's llama_model_quantize, GGUF input only); 'auto': llama.cpp's when installed")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from collections import Counter
    from pathlib import Path

    from st_sdk.errors import InputError
    from st_sdk.sizes import fmt_bytes
    from st_sdk.weights import open_model
    from st_sdk.weights.export import gguf_specs
    from st_sdk.weights.requantize import quantize_gguf

    out = Path(args.output)
    if out.suffix != ".gguf":
        raise InputError(f"{out}: the output must be a .gguf file")
    mf = open_model(args.input)
    if out.resolve() == Path(mf.path).resolve():
        raise InputError(f"{out}: refusing to overwrite the input file")
    if args.quantizer == "st-sdk":
        gguf_specs(mf.config, args.type, args.pure)   # a type st-sdk cannot write fails here, not midway
    t0 = time.perf_counter()
    used = quantize_gguf(mf.path, out, args.type, args.quantizer, args.pure)
    seconds = time.perf_counter() - t0
    written = open_model(out)
    types = Counter(written.get(n).fmt for n in written.names)
    mix = ", ".join(f"{t} x{n}" for t, n in types.most_common())
    print(f"gguf: {out} ({fmt_bytes(out.stat().st_size)}, {args.type}{' pure' if args.pure else ''}: {mix}; "
          f"{used} quantiser, {seconds:.1f} s)")
    return 0
