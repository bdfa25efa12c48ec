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

    python benchmarks/huge_pages.py --model FILE [--max-memory 6GiB] [--rounds 4] [--tokens 150] [--warm 20]

instead times whole decode steps of a model file (the SDK's defaults, or its memory-budget mode with
--max-memory), loaded in a fresh process per run with ST_HUGE_PAGES=0 and 1 alternating: --warm random
tokens fed one at a time, then the median time of --tokens more; prints both medians and the median of
the paired ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrices", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gaps", default="0,150,500")
    ap.add_argument("--model", help="time whole decode steps of this file instead")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return decode_child(a)
    if a.model:
        return decode_rounds(a)

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


def decode_child(a) -> None:
    import st_sdk

    m = st_sdk.load(a.model, n_threads=a.threads, max_memory=a.max_memory)
    ids = [int(t) for t in np.random.default_rng(1).integers(256, m.config.vocab_size, a.warm + a.tokens)]
    s = m.session(capacity=len(ids) + 1)
    for t in ids[:a.warm]:
        s.feed([t])
    t0 = time.perf_counter()
    for t in ids[a.warm:]:
        s.feed([t])
    print(json.dumps({"ms": (time.perf_counter() - t0) / a.tokens * 1e3}))


def decode_rounds(a) -> None:
    args = [sys.executable, __file__, "--child", "--model", a.model, "--threads", str(a.threads),
            "--tokens", str(a.tokens), "--warm", str(a.warm)] + (["--max-memory", a.max_memory] if a.max_memory else [])
    ms = {"0": [], "1": []}
    for _ in range(a.rounds):
        for flag in ms:
            out = subprocess.run(args, env={**os.environ, "ST_HUGE_PAGES": flag}, capture_output=True, text=True,
                                 check=True).stdout
            ms[flag].append(json.loads(out.strip().splitlines()[-1])["ms"])
    ratio = median(x / y for x, y in zip(ms["0"], ms["1"]))
    print(f"{a.model}, max_memory={a.max_memory}, {a.threads} threads, {a.rounds} rounds of {a.tokens} tokens "
          f"after {a.warm}: ST_HUGE_PAGES=0 {median(ms['0']):.1f} ms a token, ST_HUGE_PAGES=1 {median(ms['1']):.1f} "
          f"(runs {[round(x, 1) for x in ms['0']]} / {[round(x, 1) for x in ms['1']]}); paired ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
