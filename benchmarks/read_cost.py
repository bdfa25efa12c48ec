"""What reading experts from disk costs the compute on this machine: a memory-bound NumPy sum on 1 and 2
threads (in a child process), timed in windows alternately without and with expert-sized reads at a
fixed rate (O_DIRECT at random offsets of FILE, through io_uring as budget mode reads its prepared
expert file), with the shares of the machine's CPU that the hypervisor took (steal) and that the
kernel spent, from /proc/stat.

On a virtual machine whose host serves the virtual disk on the cores that run the guest, the reads
cost the compute threads time the guest does not see as its own: budget mode's expert reads slow its
kernels beyond the time it waits for them (docs/memory_budget.md). A core left idle absorbs that work.

    python benchmarks/read_cost.py FILE [--rate 200MiB] [--read-size 3MiB] [--threads 1,2]
        [--seconds 8] [--rounds 2]

FILE: any large file on the disk the experts are read from (a model file, or its prepared expert
file under the cache directory's experts/). The figures are medians over the rounds.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np


def cpu_times() -> list[int]:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def compute(threads: int, counts, stop) -> None:
    """Sum a 256 MiB float32 array per thread over and over; counts[i]: sums finished by thread i."""
    import threading

    arrays = [np.ones(64 << 20, np.float32) for _ in range(threads)]

    def run(i: int) -> None:
        while not stop.is_set():
            arrays[i].sum()   # NumPy releases the GIL for the reduction
            counts[i] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


class Reader:
    """Reads of `size` bytes at random 4 KiB-aligned offsets of a file, O_DIRECT, into a ring of buffers:
    through io_uring where it is available (the expert cache's Ring), else pread."""

    def __init__(self, path: str, size: int):
        from st_sdk.offload.uring import Ring

        self.size = -(-size // 4096) * 4096
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        self.file_size = os.fstat(self.fd).st_size
        if self.file_size < 4 * self.size:
            raise SystemExit(f"{path}: {self.file_size} bytes, too small for reads of {self.size}")
        self.buffers = mmap.mmap(-1, 8 * self.size)
        self.base = np.frombuffer(self.buffers, np.uint8).ctypes.data
        self.ring = Ring.open()
        self.rng = np.random.default_rng(0)
        self.n = 0

    def read_one(self) -> None:
        offset = int(self.rng.integers(0, (self.file_size - self.size) // 4096)) * 4096
        slot = self.n % 8
        self.last = (slot, offset)
        self.n += 1
        if self.ring is not None:
            self.ring.read([(self.fd, self.base + slot * self.size, self.size, offset, self.n)])
            got = self.ring.wait(self.n)
        else:
            got = os.preadv(self.fd, [memoryview(self.buffers)[slot * self.size:(slot + 1) * self.size]], offset)
        if got != self.size:
            raise SystemExit(f"read of {self.size} bytes at {offset}: {got}")

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        os.close(self.fd)


def window(counts, seconds: float, reader: Reader | None, rate: float) -> dict:
    """One window: the sums' rate (GB/s), the reads' rate (MiB/s) and the CPU shares over it."""
    c0, s0, t0 = sum(counts), cpu_times(), time.perf_counter()
    done = 0
    while (elapsed := time.perf_counter() - t0) < seconds:
        if reader is None:
            time.sleep(min(0.1, seconds - elapsed))
            continue
        ahead = done / rate - elapsed
        if ahead > 0:
            time.sleep(ahead)
        reader.read_one()
        done += reader.size
    elapsed = time.perf_counter() - t0
    d = [b - a for a, b in zip(s0, cpu_times())]
    total = sum(d) or 1
    return {"compute": (sum(counts) - c0) * (256 << 20) / elapsed / 1e9, "reads": done / elapsed / 2**20,
            "steal": d[7] / total, "kernel": (d[2] + d[5] + d[6]) / total}


def main(argv=None) -> int:
    from st_sdk.sizes import parse_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--rate", default="200MiB", help="bytes a second read while reading (default 200MiB)")
    ap.add_argument("--read-size", default="3MiB", help="bytes a read (default 3MiB, a 21b-a3b Q4_0 expert's size)")
    ap.add_argument("--threads", default="1,2", help="compute threads to measure, comma-separated (default 1,2)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds a window (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of windows per thread count (default 2)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.file):
        ap.error(f"{args.file}: no such file")
    values = {}
    for flag, text, parse in (("--rate", args.rate, parse_size), ("--read-size", args.read_size, parse_size),
                              ("--threads", args.threads, lambda t: [int(x) for x in t.split(",")])):
        try:
            values[flag] = parse(text)
        except Exception:
            ap.error(f"{flag}: cannot read {text!r}")
    rate, size, threads = float(values["--rate"]), values["--read-size"], values["--threads"]
    if rate <= 0 or size <= 0 or args.rounds < 1 or args.seconds <= 0 or min(threads) < 1:
        ap.error("--rate, --read-size, --seconds, --rounds and --threads must be positive")
    try:
        reader = Reader(args.file, size)
    except OSError as e:
        ap.error(f"{args.file}: cannot be read with O_DIRECT ({e.strerror}); give a file on the disk the experts "
                 f"are read from")
    print(f"# read_cost: {args.file} ({reader.file_size / 1e9:.1f} GB), reads of {reader.size / 2**20:.2f} MiB at "
          f"random offsets, O_DIRECT through {'io_uring' if reader.ring is not None else 'pread'}, "
          f"{rate / 2**20:.0f} MiB/s asked; {args.seconds:g} s windows, {args.rounds} rounds; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"{'threads':>7}  {'compute alone':>13}  {'with reads':>10}  {'loss':>5}  {'reads':>10}  "
          f"{'steal alone / with reads':>24}  {'kernel with reads':>17}")
    ctx = mp.get_context("spawn")
    try:
        for n in threads:
            counts, stop = ctx.Array("q", n, lock=False), ctx.Event()
            child = ctx.Process(target=compute, args=(n, counts, stop), daemon=True)
            child.start()
            try:
                time.sleep(2.0)   # the arrays allocated and touched
                alone, busy = [], []
                for _ in range(args.rounds):
                    alone.append(window(counts, args.seconds, None, rate))
                    busy.append(window(counts, args.seconds, reader, rate))
            finally:
                stop.set()
                child.join(10)
            med = {k: statistics.median(w[k] for w in busy) for k in busy[0]}
            base = statistics.median(w["compute"] for w in alone)
            steal0 = statistics.median(w["steal"] for w in alone)
            loss = 1 - med["compute"] / base
            print(f"{n:>7}  {base:>8.2f} GB/s  {med['compute']:>5.2f} GB/s  {loss if abs(loss) >= 0.005 else 0.0:>5.0%}  "
                  f"{med['reads']:>5.0f} MiB/s  {steal0:>13.0%} / {med['steal']:<8.0%}  {med['kernel']:>17.0%}",
                  flush=True)
    finally:
        reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
