"""How many layers ahead budget mode should read: depths compared in one process, in paired rounds.

Loads MODEL once under --budget (the default prefetch, "auto"), decodes --warmup teacher-forced diverse
tokens (benchmarks/offload_budget.py's ids) to fill the cache, then alternates the depths of
`model.offload.lookahead` (st_sdk.offload.experts.Lookahead) round by round, in alternating order:
each round, per depth, a few settling tokens, then --tokens measured ones. One process and one cache,
so the host's drift and the cache's state weigh on every depth alike, which separate runs of
offload_budget.py (each within a few percent of the next at best) cannot resolve. Prints, per depth,
the medians of tokens/s, of the time stalled on reads and of the bytes read per token, and the median
of the rounds' ratios to the first depth. Run it in a cgroup of the budget's size to measure it as
offload_budget.py does (the figures in docs/memory_budget.md were taken without one).

    python benchmarks/lookahead_depth.py MODEL.gguf --budget 8GiB [--depths 2,3,4] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from offload_budget import TOKENS_OF  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--depths", default="2,3", help="comma-separated depths; ratios are to the first")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=50, help="measured tokens per depth and round")
    ap.add_argument("--settle", type=int, default=10, help="tokens decoded after each switch, not measured")
    ap.add_argument("--warmup", type=int, default=250, help="tokens decoded before the first round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    if len(depths) < 2 or min(depths) < 1:
        ap.error("--depths: at least two depths, each 1 or more")

    import st_sdk

    n_all = args.warmup + args.rounds * len(depths) * (args.settle + args.tokens)
    model = st_sdk.load(args.model, n_threads=args.threads, max_memory=args.budget, context=n_all + 1)
    ahead, stats = model.offload.lookahead, model.offload.stats
    if ahead is None:
        ap.error("this load reads no layer ahead (prefetch is not 'auto')")
    vocab = model.config.vocab_size
    toks = iter(int(t) for t in eval(TOKENS_OF, {"np": np, "vocab": vocab, "n_all": n_all}))
    session = model.session(capacity=n_all + 1)

    def decode(n: int) -> tuple[float, float, float]:
        stall, read = stats.stall_s, stats.bytes_read
        t0 = time.perf_counter()
        for _ in range(n):
            session.feed([next(toks)])
        dt = time.perf_counter() - t0
        return n / dt, (stats.stall_s - stall) / n * 1e3, (stats.bytes_read - read) / n / 2**20

    decode(args.warmup)
    runs: dict[int, list] = {d: [] for d in depths}
    for r in range(args.rounds):
        for d in (depths if r % 2 == 0 else depths[::-1]):
            ahead.__init__(ahead.cache, ahead.mode, d)   # depth d, its guesses judged afresh
            decode(args.settle)
            runs[d].append(decode(args.tokens))
    print(f"{args.model}, budget {args.budget}, {args.threads} threads, {args.rounds} rounds of "
          f"{args.settle} + {args.tokens} tokens per depth after {args.warmup}")
    base = np.array([r[0] for r in runs[depths[0]]])
    for d in depths:
        v = np.array(runs[d])
        ratio = np.median(v[:, 0] / base)
        print(f"  depth {d}: {np.median(v[:, 0]):.2f} tok/s (rounds {', '.join(f'{x:.2f}' for x in v[:, 0])}), "
              f"stalled {np.median(v[:, 1]):.2f} ms a token, read {np.median(v[:, 2]):.1f} MiB a token, "
              f"paired ratio to depth {depths[0]}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
