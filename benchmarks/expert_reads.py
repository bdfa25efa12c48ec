"""Who reads the experts from the prepared expert file: io_uring against the I/O threads, in one process,
in paired rounds (benchmarks/paired_rounds.py: one model and one cache, the readers alternated round by
round). Each switch first waits for the reads in flight.

    python benchmarks/expert_reads.py MODEL.gguf --budget 8GiB [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import paired_rounds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paired_rounds.add_arguments(ap)
    args = ap.parse_args(argv)
    model, n_all = paired_rounds.load(args, 2)
    cache = model.offload
    ring = cache._ring
    if cache.prepared is None or ring is None:
        ap.error("this load reads no prepared expert file through io_uring (see its memory plan, "
                 "and ST_OFFLOAD_URING)")

    def reader(r):
        def switch():
            for _, fut in list(cache.pending.values()):
                fut.result()
            cache._settle()
            cache._ring = r
        return switch

    return paired_rounds.compare(args, model, n_all, {"io_uring": reader(ring), "threads": reader(None)}, "reader")


if __name__ == "__main__":
    sys.exit(main())
