"""Time to first token with and without the prompt cache, on a 1,000-token shared prefix.

    python benchmarks/prefix_cache_ttft.py MODEL.gguf [--backend c] [--prefix 1000] [--suffix 24] [--rounds 5]

Each round runs two requests whose prompts are the same `--prefix` random token ids followed by a
different `--suffix` of ids: "cold" with the prompt cache emptied first (the whole prompt is read),
then "warm" right after a request that shared the prefix (only the suffix is read). Time to first
token is the wall time of `generate(prompt, max_new_tokens=1)`. Rounds are interleaved; the figures
are medians and the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--backend", default="c")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--suffix", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import st_sdk

    model = st_sdk.load(args.model, backend=args.backend, n_threads=args.threads)
    cfg = model.config
    print(f"# prefix_cache_ttft: model {args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}), backend {model.backend.name}, threads {args.threads or 'default'}, "
          f"weights {model.selection.weight_format}, prefix {args.prefix}, suffix {args.suffix}, "
          f"python {platform.python_version()}, loadavg {os.getloadavg()[:3]}")
    rng = np.random.default_rng(0)
    lo, hi = min(1000, cfg.vocab_size // 4), min(cfg.vocab_size, 100_000)
    prefix = rng.integers(lo, hi, args.prefix).tolist()
    suffix = lambda: rng.integers(lo, hi, args.suffix).tolist()   # noqa: E731

    def ttft(prompt) -> tuple[float, int]:
        t0 = time.perf_counter()
        res = model.generate(prompt, max_new_tokens=1, seed=0)
        return time.perf_counter() - t0, res.timings["cached_tokens"]

    ttft(prefix[:8] + suffix())   # warm up the backend
    cold, warm, ratios = [], [], []
    for r in range(args.rounds):
        model.prompt_cache.clear()
        c, c_cached = ttft(prefix + suffix())
        w, w_cached = ttft(prefix + suffix())
        cold.append(c)
        warm.append(w)
        ratios.append(c / w)
        print(f"round {r}: cold {c:.3f} s ({c_cached} cached tokens), warm {w:.3f} s ({w_cached} cached tokens), "
              f"{c / w:.1f}x, loadavg {os.getloadavg()[0]:.2f}")
    print(f"median time to first token: without the prompt cache {statistics.median(cold):.3f} s, with it "
          f"{statistics.median(warm):.3f} s; median per-round ratio {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    sys.exit(main())
