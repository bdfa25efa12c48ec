"""`st-sdk demo`: the first command to run. Loads the small SmallThinker trained on Python's documentation
that ships in st_sdk/data (or, with --preset, a random-weight model of a real shape that it synthesises
into the user cache directory once) with automatic backend selection and streams a generation."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: a docstring opening, the kind of text the shipped model was trained on
DEFAULT_PROMPT = "Return a new list"
RANDOM_PROMPT = "Once upon a time,"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="generate with the small trained model shipped with st-sdk (no download)",
        description="Load the small SmallThinker shipped with st-sdk (trained on the docstrings of Python's standard "
                    "library, so it writes documentation-like English) with automatic backend selection and stream "
                    "a generation. --preset instead writes a model with random weights and a real shape to the user "
                    "cache directory (ST_SDK_CACHE_DIR overrides it; reused on later runs): its text is "
                    "meaningless, it shows the shape's speed.")
    p.add_argument("--preset", default=None, help="a random-weight model of this shape instead of the trained one: "
                                                  "tiny, 4b-a0.6b or 21b-a3b (the big ones take minutes and gigabytes)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: override the preset's number of layers")
    p.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_PROMPT!r}, "
                                                  f"{RANDOM_PROMPT!r} with --preset)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--backend", default="auto", help="auto (default), a backend name, or a comma priority list")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (and of the weights with --preset)")
    p.set_defaults(func=run)


def demo_dir(preset: str, layers: int | None, seed: int) -> Path:
    from st_sdk.selection_cache import cache_dir

    return cache_dir() / "demo" / f"{preset}{'' if layers is None else f'-L{layers}'}-seed{seed}"


def ensure_model(path: Path, preset: str, layers: int | None, seed: int) -> bool:
    """Write the model unless a complete copy is there; True when it was written now. Written to a
    temporary sibling and renamed, so an interrupted run never leaves a half model to reuse."""
    if (path / "config.json").is_file():
        return False
    from st_sdk.synth import write_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_model(tmp, preset=preset, layers=layers, formats=("hf",), dtype="f32", seed=seed)
        try:
            os.replace(tmp, path)
        except OSError:        # another process finished first: use its copy
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def run(args: argparse.Namespace) -> int:
    import st_sdk
    from st_sdk.sizes import tree_bytes
    from st_sdk.data import MODEL

    if args.preset is None and args.layers is not None:
        print("st-sdk demo: --layers needs --preset (the trained model has one shape)", file=sys.stderr)
        return 2
    if args.preset is None and not MODEL.is_file():
        print(f"st-sdk demo: the trained model is missing from this installation ({MODEL}); "
              "using a random-weight model instead (reinstall st-sdk to get it back)")
        args.preset = "tiny"
    if args.preset is None:
        print("st-sdk demo: a small SmallThinker trained on the docstrings of Python's standard library, "
              "shipped with st-sdk. It continues text in the style of that documentation; it is far too small "
              "to be right about anything (`--preset tiny|4b-a0.6b|21b-a3b` runs random weights of a real shape).")
        path = MODEL
        print(f"model: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    else:
        print("st-sdk demo: a SmallThinker-shaped model with RANDOM weights, so the text below is meaningless; "
              "it shows that files, tokenizer, backend selection, sampling and streaming work on this machine.")
        path = demo_dir(args.preset, args.layers, args.seed)
        t0 = time.perf_counter()
        written = ensure_model(path, args.preset, args.layers, args.seed)
        how = f"synthesised in {time.perf_counter() - t0:.1f} s" if written else "reused"
        print(f"model: {path} ({how}, {tree_bytes(path) / 2**20:.1f} MiB on disk)")
        prompt = RANDOM_PROMPT if args.prompt is None else args.prompt

    print(f"loading with backend {args.backend!r} (probing the installed backends)...", flush=True)
    t0 = time.perf_counter()
    backend = args.backend.split(",") if "," in args.backend else args.backend
    model = st_sdk.load(path, backend=backend)
    c = model.config
    print(f"loaded in {time.perf_counter() - t0:.1f} s: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.moe_num_primary_experts} experts ({c.moe_num_active_primary_experts} active per token), "
          f"vocab {c.vocab_size}, {c.parameter_count() / 1e6:.2f} M parameters")
    sel = model.selection
    why = getattr(sel, "rule", None)
    print(f"backend: {model.backend.name}" + (f" ({why})" if why else ""))
    print(f"prompt: {prompt!r}, sampling with seed {args.seed}\n---")

    stream = model.generate(prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stream=True)
    with stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    res = stream.result
    t = res.timings
    print(f"\n---\n{len(res.token_ids)} tokens (finish: {res.finish_reason}); "
          f"prefill {t['prompt_tokens']} tokens at {t['prefill_tokens_per_s']:.1f} tokens/s, "
          f"decode {t['decode_tokens_per_s']:.1f} tokens/s on {model.backend.name}")
    print("next: `st-sdk generate demo -p TEXT` (or a real SmallThinker .gguf or HF directory), "
          "`st-sdk perplexity demo demo`, `st-sdk backends` to see the backend choice.")
    return 0
