"""How many layers ahead budget mode should read: depths compared in one process, in paired rounds
(benchmarks/paired_rounds.py: one model and one cache, the depths alternated round by round).

Switches the depth of `model.offload.lookahead` (st_sdk.offload.experts.Lookahead), its guesses judged
afresh at each switch. Run it in a cgroup of the budget's size to measure it as offload_budget.py does
(the figures in docs/memory_budget.md were taken without one).

    python benchmarks/lookahead_depth.py MODEL.gguf --budget 8GiB [--depths 2,3,4] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import paired_rounds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paired_rounds.add_arguments(ap)
    ap.add_argument("--depths", default="2,3", help="comma-separated depths; ratios are to the first")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    if len(depths) < 2 or min(depths) < 1:
        ap.error("--depths: at least two depths, each 1 or more")
    model, n_all = paired_rounds.load(args, len(depths))
    ahead = model.offload.lookahead
    if ahead is None:
        ap.error("this load reads no layer ahead (prefetch is not 'auto')")

    def depth(d: int):
        return lambda: ahead.__init__(ahead.cache, ahead.mode, d)   # depth d, its guesses judged afresh

    return paired_rounds.compare(args, model, n_all, {str(d): depth(d) for d in depths}, "depth")


if __name__ == "__main__":
    sys.exit(main())
