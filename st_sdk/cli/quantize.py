"""`st-sdk quantize IN OUT.gguf --type T`: convert an HF directory or GGUF to a GGUF llama.cpp loads."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="convert a model (HF directory or GGUF) to a GGUF of another type",
                       description="Write OUT.gguf with the matrices stored as --type; norms and the router "
                                   "stay f32 (a quantised router scrambles the top-k).")
    p.add_argument("input", metavar="IN", help="HF directory or .gguf file")
    p.add_argument("output", metavar="OUT.gguf")
    p.add_argument("--type", default="q8_0", choices=["q8_0", "q4_0", "f16", "bf16", "f32"])
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from st_sdk.errors import InputError
    from st_sdk.weights import open_model
    from st_sdk.weights.export import export, model_tensors

    out = Path(args.output)
    if out.suffix != ".gguf":
        raise InputError(f"{out}: the output must be a .gguf file")
    mf = open_model(args.input)
    if out.resolve() == Path(mf.path).resolve():
        raise InputError(f"{out}: refusing to overwrite the input file")
    tmp = out.with_name(out.name + ".part")   # never leave a half-written OUT behind
    try:
        export(mf.config, model_tensors(mf), args.type, gguf_path=tmp, tokenizer=mf.tokenizer,
               desc=f"quantize {args.type}")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"gguf: {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0
