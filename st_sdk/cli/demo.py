"""`st-sdk demo`: the first command to run. Synthesises a small random-weight SmallThinker into the user
cache directory (once), loads it with automatic backend selection and streams a generation."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = "Once upon a time,"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="synthesise a small random model and generate with it (no download)",
        description="Write a small SmallThinker-shaped model with random weights to the user cache directory "
                    "(ST_SDK_CACHE_DIR overrides it; reused on later runs), load it with automatic backend "
                    "selection and stream a generation. The weights are random, so the text is meaningless: "
                    "the demo shows the whole path (files, tokenizer, backend, sampling, streaming) works here.")
    p.add_argument("--preset", default="tiny", help="model shape: tiny (default), 4b-a0.6b or 21b-a3b "
                                                    "(the big ones take minutes and gigabytes)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    p.add_argument("-n", "--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--backend", default="auto", help="auto (default), a backend name, or a comma priority list")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of sampling")
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


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> int:
    import st_sdk

    print("st-sdk demo: a SmallThinker-shaped model with RANDOM weights, so the text below is meaningless; "
          "it shows that files, tokenizer, backend selection, sampling and streaming work on this machine.")
    path = demo_dir(args.preset, args.layers, args.seed)
    t0 = time.perf_counter()
    written = ensure_model(path, args.preset, args.layers, args.seed)
    how = f"synthesised in {time.perf_counter() - t0:.1f} s" if written else "reused"
    print(f"model: {path} ({how}, {_size(path) / 2**20:.1f} MiB on disk)")

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
    print(f"prompt: {args.prompt!r}, sampling with seed {args.seed}\n---")

    stream = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stream=True)
    with stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    res = stream.result
    t = res.timings
    print(f"\n---\n{len(res.token_ids)} tokens (finish: {res.finish_reason}); "
          f"prefill {t['prompt_tokens']} tokens at {t['prefill_tokens_per_s']:.1f} tokens/s, "
          f"decode {t['decode_tokens_per_s']:.1f} tokens/s on {model.backend.name}")
    print("next: `st-sdk generate MODEL -p TEXT` / `st-sdk chat MODEL` with a real SmallThinker .gguf or HF "
          "directory, `st-sdk backends` to see the backend choice.")
    return 0
