"""Variants of one budget-mode model compared in one process, in paired rounds (benchmarks/lookahead_depth.py,
benchmarks/expert_reads.py, benchmarks/idle_spin.py).

Loads MODEL once under a budget, decodes `warmup` teacher-forced diverse tokens (benchmarks/offload_budget.py's
ids) to fill the cache, then switches between the variants round by round, in alternating order: each round,
per variant, a few settling tokens, then `tokens` measured ones. One process and one cache, so the host's
drift and the cache's state weigh on every variant alike, which separate runs of offload_budget.py (each
within a few percent of the next at best) cannot resolve. Reports, per variant, the medians of tokens/s, of
the time stalled on reads, of the bytes read and of the CPU time of every thread of the process per token,
and the median of the rounds' ratios to the first variant.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from offload_budget import TOKENS_OF  # noqa: E402


def add_arguments(ap) -> None:
    ap.add_argument("model")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=50, help="measured tokens per variant and round")
    ap.add_argument("--settle", type=int, default=10, help="tokens decoded after each switch, not measured")
    ap.add_argument("--warmup", type=int, default=250, help="tokens decoded before the first round")
    ap.add_argument("--threads", type=int, default=2)


def load(args, variants: int):
    """The model under --budget (the default prefetch, "auto"), with context for every token the rounds decode."""
    import st_sdk

    n_all = args.warmup + args.rounds * variants * (args.settle + args.tokens)
    return st_sdk.load(args.model, n_threads=args.threads, max_memory=args.budget, context=n_all + 1), n_all


def compare(args, model, n_all: int, variants: dict[str, Callable[[], None]], what: str) -> int:
    """Run the paired rounds (each variant's function switches the model to it) and print the report."""
    stats, vocab = model.offload.stats, model.config.vocab_size
    toks = iter(int(t) for t in eval(TOKENS_OF, {"np": np, "vocab": vocab, "n_all": n_all}))
    session = model.session(capacity=n_all + 1)

    def decode(n: int) -> tuple[float, float, float, float]:
        stall, read, cpu = stats.stall_s, stats.bytes_read, time.process_time()   # every thread's CPU
        t0 = time.perf_counter()
        for _ in range(n):
            session.feed([next(toks)])
        dt = time.perf_counter() - t0
        return (n / dt, (stats.stall_s - stall) / n * 1e3, (stats.bytes_read - read) / n / 2**20,
                (time.process_time() - cpu) / n * 1e3)

    names = list(variants)
    variants[names[0]]()
    decode(args.warmup)
    runs: dict[str, list] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            variants[name]()
            decode(args.settle)
            runs[name].append(decode(args.tokens))
    print(f"{args.model}, budget {args.budget}, {args.threads} threads, {args.rounds} rounds of "
          f"{args.settle} + {args.tokens} tokens per {what} after {args.warmup}")
    base = np.array([r[0] for r in runs[names[0]]])
    for name in names:
        v = np.array(runs[name])
        print(f"  {what} {name}: {np.median(v[:, 0]):.2f} tok/s (rounds {', '.join(f'{x:.2f}' for x in v[:, 0])}), "
              f"stalled {np.median(v[:, 1]):.2f} ms a token, read {np.median(v[:, 2]):.1f} MiB a token, "
              f"CPU {np.median(v[:, 3]):.1f} ms a token (all threads), "
              f"paired ratio to {names[0]}: {np.median(v[:, 0] / base):.3f}")
    return 0
