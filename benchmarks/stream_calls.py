"""How fast the C backend streams a dense decode matvec by its length: one long call against many
short ones over the same number of bytes.

    python benchmarks/stream_calls.py [--long 151936] [--rows 768,1536,6144,24576] [--threads 2] [--rounds 12]

Q4_0 weights, repacked 8 rows at a time as a model's are, hidden size 1536 (the 4b-a0.6b): `--long`
rows in one call (151,936: the output head, 131.3 MB), against calls of `--rows` rows each (768: one
expert's gate, 1,536: the attention output, 6,144 and 24,576 for the trend), as many as give the same
bytes. Each call is `st_linear` on one activation row over the pool of `--threads` threads, the row
split between them as a decode step splits it; every matrix lies at its own 2 MiB-aligned place in a
1.5 GiB buffer (huge pages where granted), so the bytes come mostly from memory (a last-level cache
of a third of that, as on the Intel host of docs/c_backend.md, can still hold some). Each round times the long
call, the short ones, and the long call again; printed per size: the median over the rounds of the
long calls' rate over the short ones' (above 1: the long stream is faster), its range, and the last
round's rates. The weights are zeros (the kernels' time does not depend on the values).
"""
from __future__ import annotations

import argparse
import mmap
import time
from statistics import median

import numpy as np

HIDDEN = 1536
BUFFER = 1536 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", type=int, default=151936, help="rows of the long matrix (a multiple of 8)")
    ap.add_argument("--rows", default="768,1536,6144,24576", help="rows of the short ones, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    a = ap.parse_args()
    from st_sdk_backends.c import ops
    from st_sdk_backends.c.backend import best_variant, get_pool

    ffi, lib = ops.ffi_lib()
    lib.st_set_variant(ops.VARIANTS[best_variant(lib)])
    pool = get_pool(a.threads)
    fmt = ops.repacked_code("q4_0")
    group_bytes = int(lib.st_repacked_bytes(ops.FMT_CODE["q4_0"], 8, HIDDEN))
    region = mmap.mmap(-1, BUFFER)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(region, np.uint8)
    buf[:] = 0
    base = ffi.cast("uint8_t *", buf.ctypes.data)
    x = np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32)
    y = np.zeros(max(a.long, *(int(r) for r in a.rows.split(","))), np.float32)
    xp, yp = ffi.cast("float *", x.ctypes.data), ffi.cast("float *", y.ctypes.data)
    rng = np.random.default_rng(1)

    def calls(rows: int, n: int) -> float:
        """bytes per second of n calls on matrices of `rows` rows, each at its own place"""
        nbytes = rows // 8 * group_bytes
        mats = []
        for off in rng.integers(0, (BUFFER - nbytes) // (2 << 20), n) * (2 << 20):
            m = ffi.new("st_mat *")
            m.data, m.rows, m.cols, m.row_bytes, m.fmt = base + int(off), rows, HIDDEN, group_bytes, fmt
            mats.append(m)
        t0 = time.perf_counter()
        for m in mats:
            if lib.st_linear(pool, m, xp, 1, yp):
                raise SystemExit("st_linear failed")
        return n * nbytes / (time.perf_counter() - t0)

    long_bytes = a.long // 8 * group_bytes
    print(f"{best_variant(lib)}, {a.threads} threads; the long matrix {a.long} rows, {long_bytes / 1e6:.1f} MB")
    for rows in (int(r) for r in a.rows.split(",")):
        n = max(1, round(long_bytes / (rows // 8 * group_bytes)))
        calls(rows, 2)   # warm-up
        ratios = []
        for _ in range(a.rounds):
            first, short, second = calls(a.long, 1), calls(rows, n), calls(a.long, 1)
            ratios.append((first + second) / 2 / short)
        print(f"{rows:6d} rows x {n:4d} calls: long over short {median(ratios):.3f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}); last round {(first + second) / 2e9:.1f} against "
              f"{short / 1e9:.1f} GB/s", flush=True)
    del buf, base
    region.close()


if __name__ == "__main__":
    main()
