"""Quantisation quality of a model: perplexity and KL divergence against its F32 file for each weight
type, quantiser and backend (the table in docs/files.md).

    python tools/quant_table.py F32.gguf --out DIR [--text demo] [--types f16,bf16,q8_0,...]
        [--quantizers st-sdk,llama.cpp] [--backends numpy,c,torch,jax] [--max-tokens N] [--context N]

Writes DIR/<type>-<quantizer>.gguf with `st-sdk quantize`, then per backend computes the F32 file's
logits once and compares every file with them (`st_sdk.perplexity`): perplexity, mean and 99th
percentile KL(F32 || file), top-1 agreement. torch and jax run in float32 here, so the table measures the
weights, not the compute dtype. Prints the configuration, Markdown tables and DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's st_sdk, not an installed one

TYPES = "f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0,q3_k_m,q2_k"


def quantize(f32: Path, out: Path, t: str, quantizer: str) -> Path | str:
    """The file, or why it could not be written."""
    import contextlib
    import io

    from st_sdk.cli import main as cli

    path = out / f"{t}-{quantizer}.gguf"
    if path.is_file():
        return path
    argv = ["quantize", str(f32), str(path), "--type", t] + ([] if quantizer == "st-sdk" else ["--quantizer", quantizer])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli(argv)
        except SystemExit as e:   # argparse: an option or type this st-sdk does not have
            code = e.code
    return path if code == 0 and path.is_file() else (err.getvalue().strip().splitlines() or ["failed"])[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("f32", type=Path, help="the F32 GGUF (tools/train_smallthinker.py writes one)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the quantised files and results.json")
    ap.add_argument("--text", default="demo", help="text file, or 'demo' (the shipped held-out text)")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--quantizers", default="st-sdk,llama.cpp")
    ap.add_argument("--backends", default="numpy,c,torch,jax")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args(argv)

    import st_sdk
    from st_sdk.data import resolve_text
    from st_sdk.perplexity import chunk_logits, perplexity

    args.out.mkdir(parents=True, exist_ok=True)
    text_path = Path(resolve_text(args.text))
    quantizers = args.quantizers.split(",")
    if "llama.cpp" in quantizers:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp's quantiser is left out")
            quantizers.remove("llama.cpp")
    files: dict[tuple[str, str], Path] = {}
    for t in args.types.split(","):
        for q in quantizers:
            r = quantize(args.f32, args.out, t, q)
            if isinstance(r, Path):
                files[(t, q)] = r
            else:
                print(f"skipped {t} by {q}'s quantiser: {r}")
    print(f"config: base {args.f32}; text {text_path} (first {args.max_tokens} tokens, chunks of {args.context}); "
          f"backends {args.backends} (torch/jax in float32); OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; "
          f"st-sdk {st_sdk.__version__}; load average {open('/proc/loadavg').read().split()[:3]}", flush=True)

    results = []
    for backend in args.backends.split(","):
        dtype = "float32" if backend in ("torch", "jax") else None
        try:
            base = st_sdk.load(args.f32, backend=backend, dtype=dtype)
        except Exception as e:
            print(f"backend {backend}: unavailable ({type(e).__name__}: {e})")
            continue
        ids = base.tokenizer.encode(text_path.read_text(encoding="utf-8"))[:args.max_tokens]
        t0 = time.perf_counter()
        ref = chunk_logits(base, ids, args.context)
        f32 = perplexity(base, ids, args.context, base=ref)
        results.append(dict(backend=backend, type="f32", quantizer="-", size=args.f32.stat().st_size,
                            **f32.to_dict()))
        print(f"{backend}: f32 perplexity {f32.perplexity:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for (t, q), path in files.items():
            m = st_sdk.load(path, backend=backend, dtype=dtype)
            r = perplexity(m, ids, args.context, base=ref)
            results.append(dict(backend=backend, type=t, quantizer=q, size=path.stat().st_size, **r.to_dict()))
            print(f"{backend}: {t:7} {q:9} ppl {r.perplexity:.4f}  KL mean {r.kl.mean:.5f} p99 {r.kl.p99:.5f}  "
                  f"top-1 {100 * r.kl.top1_agreement:.2f}%", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))   # after each backend
    print()
    print(markdown(results))
    return 0


def markdown(results: list[dict]) -> str:
    """Two tables: every figure on the first backend; then perplexity and mean KL on each backend."""
    backends = list(dict.fromkeys(r["backend"] for r in results))
    rows = list(dict.fromkeys((r["type"], r["quantizer"]) for r in results))
    by = {(r["backend"], r["type"], r["quantizer"]): r for r in results}
    first = backends[0]
    out = [f"On `{first}`:", "", "| type | quantiser | MiB | PPL | KL mean | KL p99 | top-1 agreement |",
           "|---|---|---|---|---|---|---|"]
    for t, q in rows:
        r = by.get((first, t, q))
        if r is not None:
            kl = r.get("kl_divergence", {})
            out.append(f"| {t.upper()} | {q} | {r['size'] / 2**20:.1f} | {r['perplexity']:.3f} | "
                       f"{kl.get('mean', 0):.6f} | {kl.get('p99', 0):.5f} | {100 * kl.get('top1_agreement', 1):.1f}% |")
    out += ["", "Perplexity / mean KL divergence on each backend:", "",
            "| type | quantiser | " + " | ".join(backends) + " |", "|---|---|" + "---|" * len(backends)]
    for t, q in rows:
        cells = []
        for b in backends:
            r = by.get((b, t, q))
            cells.append("" if r is None else
                         f"{r['perplexity']:.3f} / {r.get('kl_divergence', {}).get('mean', 0):.6f}")
        out.append(f"| {t.upper()} | {q} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
