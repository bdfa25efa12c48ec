"""How long the C pool's workers spin for their next job in budget mode: spins compared in one process,
in paired rounds (benchmarks/paired_rounds.py: one model and one cache, the spins alternated round by
round).

Between a budget layer's C calls the compute thread runs Python and waits for expert reads; a worker
that stops spinning sleeps, and the next call wakes it. The C backend spins the default (20,000 pauses)
where io_uring reads the experts and `BUDGET_IDLE_SPIN` (2,000) while I/O threads read, which need the
core (backends/c/backend.py, `budget_idle_spin`). Each variant here sets the spin whoever reads;
"default" is the C default.

    python benchmarks/idle_spin.py MODEL.gguf --budget 8GiB [--spins default,2000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import paired_rounds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paired_rounds.add_arguments(ap)
    ap.add_argument("--spins", default="default,2000",
                    help="comma-separated pause counts, or 'default'; ratios are to the first")
    args = ap.parse_args(argv)
    names = args.spins.split(",")
    try:
        spins = {name: None if name == "default" else int(name) for name in names}
    except ValueError:
        ap.error(f"--spins: pause counts or 'default', got {args.spins!r}")
    if len(spins) < 2 or any(s is not None and s < 0 for s in spins.values()):
        ap.error("--spins: at least two different spins, none negative")
    model, n_all = paired_rounds.load(args, len(spins))
    if getattr(model.backend, "offloaded_layer", None) is None:
        ap.error(f"the {model.backend.name} backend has no fused budget layer (spins are the C backend's)")
    from st_sdk_backends.c import backend as cbackend

    def spin(n):
        def switch():
            cbackend.budget_idle_spin = lambda cache: n   # the fused layer asks it for its pool on every call
        return switch

    return paired_rounds.compare(args, model, n_all, {name: spin(n) for name, n in spins.items()}, "spin")


if __name__ == "__main__":
    sys.exit(main())
