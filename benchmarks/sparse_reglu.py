"""Sparse ReGLU's expert stage on the C backend at a chosen share of live neurons, in each layout.

    python benchmarks/sparse_reglu.py [--fmt q4_0|q8_0|q4_k|q6_k] [--down-fmt FMT] [--live 0.75,0.5,0.25,0.1]
        [--threads 1,2] [--experts 512] [--builds A.so,B.so] [--probe]

One decode step's experts (top 4 of --experts, the 4b-a0.6b shape: hidden 1536, 768 neurons each),
timed through `CBackend.moe` with the three ST_C_SPARSE_LAYOUT layouts side by side: "off" (gate, up
and down repacked 8 rows at a time: a dead neuron's up row is skipped only when its 8-row group is all
dead), "up" (up row-split: one live neuron's row at a time) and "up+down" (and down neuron-major: one
live neuron's column at a time). The k-quants have no row-split up: "up" keeps the file's layout,
whose rows are read one live neuron at a time too. The experts are picked at random from --experts of them (512 x 2 MB
per layout, more than a CPU's last-level cache, so weights come from memory as in a real model).

The share of live neurons is set by construction: the activation x is positive, and a neuron's gate
row is all positive (live for every token) with probability --live, else all negative. Random weights
give about 0.5; trained ReGLU experts far fewer (`st-sdk generate MODEL --stats` measures a model's).
Prints the median time per step over rounds in which the layouts alternate, and each layout's ratio
to "off".

`--probe` measures what the layouts' reads can reach on this host instead (st_read_chunks): memory read in
chunks of a live neuron's size, a share --live of them scattered as live neurons are, against a plain
stream of the same buffer. A skipped byte saves time only while reading the live ones costs less than
streaming them all: a live share above the scattered rate over the stream's leaves nothing to gain.

`--builds A.so,B.so` compares builds of the kernels instead (backends/c/_st_kernels.abi3.so, or another
build of it, as ST_C_KERNELS_PATH takes), in one process: the experts are converted once by the
installed build, then each build's `st_moe` (loaded with ctypes) runs the same 300 steps in every layout,
builds and layouts alternated round by round, so the host's drift weighs on all of them alike; separate
runs of this script move by more than a kernel change does on a host whose memory bandwidth moves. Each
build's output is checked against the first's (1e-3 of its largest value: the layouts' up projections sum
in other orders, and an activation of the ReGLU output that lands on a rounding boundary of its Q8
block can move by one step; 2.5e-4 measured between `off` and `up`, the same for `up+down`) before timing.
"""
from __future__ import annotations

import argparse
import ctypes
import time
from statistics import median

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", default="q4_0", choices=("q4_0", "q8_0", "q4_k", "q6_k"))
    ap.add_argument("--down-fmt", choices=("q4_0", "q8_0", "q4_k", "q6_k"),
                    help="the down projection's type, where it differs (Q4_K_M files: q4_k with a q6_k down)")
    ap.add_argument("--live", default="0.75,0.5,0.25,0.1")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--builds", help="comma-separated paths of kernel builds to compare in one process")
    ap.add_argument("--probe", action="store_true", help="measure the memory read rates behind the layouts instead")
    a = ap.parse_args()
    if a.probe:
        for live in (float(v) for v in a.live.split(",")):
            for threads in (int(t) for t in a.threads.split(",")):
                probe(threads, live, a.rounds)
        return

    from st_sdk.backend import Param
    from st_sdk.weights.tensor import WeightTensor, quantize
    from st_sdk_backends.c import ops
    from st_sdk_backends.c.backend import CBackend

    H, F, E, k = 1536, 768, a.experts, 4
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((1, H))).astype(np.float32)
    w = np.array([[0.4, 0.3, 0.2, 0.1]], np.float32)
    load = open("/proc/loadavg").read().split()[:3]
    down = f" (down {a.down_fmt})" if a.down_fmt else ""
    print(f"{a.fmt}{down}, hidden {H}, {F} neurons an expert, top {k} of {E}; load average {' '.join(load)}")
    for live in (float(v) for v in a.live.split(",")):
        raw = {}
        for part, shape in (("gate", (E, F, H)), ("up", (E, F, H)), ("down", (E, H, F))):
            v = np.abs(rng.standard_normal(shape, dtype=np.float32)) / np.sqrt(shape[2])
            signs = rng.random(shape[:2] + (1,)) < (live if part == "gate" else 0.5)
            fmt = a.down_fmt if part == "down" and a.down_fmt else a.fmt
            raw[part] = WeightTensor(part, fmt, shape, quantize(fmt, np.where(signs, v, -v)))
        layouts = {"off": ({"repack_rows": True}, {"repack_rows": True}, {"repack_rows": True}),
                   "up": ({"repack_rows": True}, {"row_split": True}, {"repack_rows": True}),
                   "up+down": ({"repack_rows": True}, {"row_split": True}, {"neuron_major": True})}
        prepared = {name: [Param(raw[p], ops.CExperts(raw[p], **kw)) for p, kw in zip(("gate", "up", "down"), kws)]
                    for name, kws in layouts.items()}
        if a.builds:
            for threads in (int(t) for t in a.threads.split(",")):
                compare_builds(a.builds.split(","), prepared, x, w, E, k, threads, a.rounds, rng, live)
            del prepared, raw
            continue
        for threads in (int(t) for t in a.threads.split(",")):
            b = CBackend(n_threads=threads)
            b.setup()
            times: dict[str, list[float]] = {name: [] for name in layouts}
            for r in range(a.rounds + 1):
                for name in (list(layouts) if r % 2 else list(layouts)[::-1]):
                    t0, n = time.perf_counter(), 0
                    while time.perf_counter() - t0 < 0.5:
                        ids = rng.choice(E, k, replace=False)[None].astype(np.int64)
                        b.moe(x, *prepared[name], ids, w)
                        n += 1
                    if r:   # round 0 warms up (first touch of the copies)
                        times[name].append((time.perf_counter() - t0) / n)
            base = median(times["off"])
            cells = ", ".join(f"{name} {median(v) * 1e6:.0f} us ({base / median(v):.2f}x)" for name, v in times.items())
            print(f"live {live:.2f}, {threads} thread{'s' if threads > 1 else ''}: {cells}", flush=True)
        del prepared, raw


def probe(threads: int, live: float, rounds: int, mib: int = 1024, ahead: int = 8) -> None:
    """Reading memory as the sparse layouts read it, against a plain stream (`st_read_chunks`, csrc): a
    buffer of `mib` MiB (huge pages where granted) read whole, then a share `live` of its chunks, picked
    at random and read in order, each fetched `ahead` chunks ahead as the kernels fetch live rows and
    columns. Chunks of 864 bytes (a live neuron's up row: 1536 weights in Q4_0) and 384 (its down
    column's share of one of two threads' rows). The scattered rate over the stream's is what a skipped
    byte saves: below it, the sparse layouts read more slowly than the dense ones stream."""
    import mmap

    from st_sdk_backends.c import ops
    from st_sdk_backends.c.backend import get_pool

    ffi, lib = ops.ffi_lib()
    pool = get_pool(threads)
    n = mib * 2**20
    region = mmap.mmap(-1, n)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(region, np.uint8)
    buf[:] = 1
    base, out = ffi.cast("const uint8_t *", buf.ctypes.data), ffi.new("uint64_t *")
    rng = np.random.default_rng(0)

    def rate(chunk: int, idx) -> float:
        m = n // chunk if idx is None else len(idx)
        p = ffi.NULL if idx is None else ffi.cast("const int32_t *", idx.ctypes.data)
        t0 = time.perf_counter()
        if lib.st_read_chunks(pool, base, chunk, p, m, ahead, out):
            raise SystemExit("st_read_chunks failed")
        return m * chunk / (time.perf_counter() - t0)

    for chunk in (864, 384):
        picks = np.flatnonzero(rng.random(n // chunk) < live).astype(np.int32)
        stream, scattered = [], []
        for r in range(rounds + 1):   # round 0 warms up
            s, c = rate(chunk, None), rate(chunk, picks)
            if r:
                stream.append(s)
                scattered.append(c)
        print(f"{threads} thread{'s' if threads > 1 else ''}, chunks of {chunk} bytes, {live:.0%} of them: "
              f"stream {median(stream) / 1e9:.1f} GB/s, scattered {median(scattered) / 1e9:.1f} GB/s "
              f"({median(c / s for c, s in zip(scattered, stream)):.0%} of the stream, median of {rounds} rounds)",
              flush=True)
    del buf
    region.close()


def compare_builds(paths, prepared, x, w, E: int, k: int, threads: int, rounds: int, rng, live: float,
                   steps: int = 300) -> None:
    """Every build's st_moe over the same steps in every layout, alternated round by round (see --builds)."""
    from st_sdk_backends.c import ops
    from st_sdk_backends.c.backend import best_variant

    ffi, lib = ops.ffi_lib()
    variant = ops.VARIANTS[best_variant(lib)]
    addr = lambda p: ctypes.c_void_p(int(ffi.cast("uintptr_t", p)))   # noqa: E731
    layouts = {name: [addr(part.value.struct) for part in parts] for name, parts in prepared.items()}
    builds = []
    for path in paths:
        so = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        so.st_pool_new.restype = ctypes.c_void_p
        so.st_moe.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + \
            [ctypes.c_int32, ctypes.c_void_p]
        if so.st_set_variant(variant):
            raise SystemExit(f"{path}: no kernels for this host's instruction set")
        builds.append((path, so, ctypes.c_void_p(so.st_pool_new(threads))))
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(steps)]).astype(np.int64)
    out = np.empty_like(x)
    ptr = lambda arr, i=0: ctypes.c_void_p(arr.ctypes.data + i * arr.strides[0])   # noqa: E731

    def run(so, pool, parts, n):
        for i in range(n):
            if so.st_moe(pool, *parts, ptr(x), 1, k, ptr(ids, i), ptr(w), 1, ptr(out)):
                raise SystemExit("st_moe failed")

    ref = None
    for path, so, pool in builds:
        for name, parts in layouts.items():
            run(so, pool, parts, 1)
            if ref is None:
                ref = out.copy()
            if np.abs(out - ref).max() > 1e-3 * np.abs(ref).max():
                raise SystemExit(f"{path}, {name}: the output differs from the first build's off layout")
    variants = [(b, name) for b in range(len(builds)) for name in layouts]
    times: dict = {v: [] for v in variants}
    for r in range(rounds + 1):   # round 0 warms up; the order reverses every round
        for v in (variants if r % 2 == 0 else variants[::-1]):
            _, so, pool = builds[v[0]]
            t0 = time.perf_counter()
            run(so, pool, layouts[v[1]], steps)
            if r:
                times[v].append((time.perf_counter() - t0) / steps)
    print(f"live {live:.2f}, {threads} thread{'s' if threads > 1 else ''}, median of {rounds} rounds of {steps} steps:")
    for b, (path, _, _) in enumerate(builds):
        print(f"  {path}: " + ", ".join(f"{name} {median(times[(b, name)]) * 1e6:.1f} us" for name in layouts),
              flush=True)


if __name__ == "__main__":
    main()
