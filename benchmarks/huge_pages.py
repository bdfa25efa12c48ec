"""Weights on 4 KiB pages against weights on huge pages, as the C kernels stream them.

    python benchmarks/huge_pages.py [--matrices 256] [--rounds 5] [--threads 2] [--gaps 0,150,500]

--matrices copies of decode's wq shape (1536 x 1536 Q4_0, repacked: 1.33 MB each, 256 of them far
beyond the last-level cache) are placed two ways: each in its own numpy array (malloc: 4 KiB pages), and
in an st_sdk Arena (2 MiB-aligned anonymous memory advised MADV_HUGEPAGE, what the C backend and the
expert cache now use). One decode-sized product (one token) is timed on each matrix in turn, the two
placements alternating round by round, with a Python busy loop of --gaps microseconds before each call
(a memory budget runs Python between its layer calls). Prints the median time per product and the
bandwidth it implies. The kernel decides whether it grants the huge pages: the script prints the
process's AnonHugePages.
"""
from __future__ import annotations

import argparse
import time
from statistics import median

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrices", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gaps", default="0,150,500")
    a = ap.parse_args()

    import gguf

    from st_sdk.offload.pages import Arena
    from st_sdk_backends.c import ops
    from st_sdk_backends.c.backend import CBackend

    CBackend().setup()   # picks the best variant this CPU runs
    ffi, lib = ops.ffi_lib()
    pool = lib.st_pool_new(a.threads)
    rows = cols = 1536
    rng = np.random.default_rng(0)
    q = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    arena = Arena()
    placed = {"4 KiB pages": [], "huge pages": []}
    for _ in range(a.matrices):
        for name in placed:
            data, rb = ops.repack(q, "q4_0", rows, cols, arena if name == "huge pages" else None)
            st = ffi.new("st_mat *", {"data": ffi.cast("void *", data.ctypes.data), "rows": rows, "cols": cols,
                                      "row_bytes": rb, "fmt": ops.repacked_code("q4_0")})
            placed[name].append((data, st))
    x = rng.standard_normal(cols).astype(np.float32)
    y = np.zeros(rows, np.float32)
    px, py = ffi.cast("float *", x.ctypes.data), ffi.cast("float *", y.ctypes.data)

    def busy(us: float) -> None:
        end = time.perf_counter() + us * 1e-6
        d = {}
        while time.perf_counter() < end:
            d[len(d)] = 1

    with open("/proc/meminfo") as fh:
        huge = next((line.split()[1] for line in fh if line.startswith("AnonHugePages")), "?")
    nbytes = placed["huge pages"][0][0].nbytes
    print(f"{a.matrices} matrices of {nbytes / 1e6:.2f} MB, {a.threads} threads, huge-page advice taken: "
          f"{arena.huge}, AnonHugePages {huge} kB")
    for gap in (float(g) for g in a.gaps.split(",")):
        times = {name: [] for name in placed}
        for _ in range(a.rounds):
            for name, mats in placed.items():
                for _, st in mats:
                    if gap:
                        busy(gap)
                    t0 = time.perf_counter()
                    ops.check(lib.st_linear(pool, st, px, 1, py), "st_linear")
                    times[name].append(time.perf_counter() - t0)
        line = ", ".join(f"{name} {median(t) * 1e6:.0f} us ({nbytes / median(t) / 1e9:.1f} GB/s)"
                         for name, t in times.items())
        print(f"gap {gap:.0f} us: {line}")
    lib.st_pool_free(pool)


if __name__ == "__main__":
    main()
