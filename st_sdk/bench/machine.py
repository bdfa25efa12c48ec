"""The machine a benchmark runs on: its description and measured read bandwidth."""
from __future__ import annotations

import sys
import threading
import time
from statistics import median
from typing import Any

import numpy as np

from ..environment import library_versions
from ..hardware import last_level_cache_bytes, probe

#: distributions whose versions decide speed, printed with every result
VERSIONED = ("st-sdk", "numpy", "torch", "jax", "jaxlib", "cffi", "llama-cpp-python", "gguf")


def machine_info(bandwidth: float | None = None) -> dict[str, Any]:
    hw = probe()
    info = {"cpu": hw.cpu_model, "arch": hw.machine, "system": hw.system, "flags": sorted(hw.features),
            "physical_cores": hw.physical_cores, "logical_cores": hw.logical_cores,
            "ram_gib": round(hw.ram_bytes / 2**30, 1) if hw.ram_bytes else None,
            "versions": {"python": sys.version.split()[0], **library_versions(VERSIONED)}}
    if bandwidth:
        info["read_bandwidth_gbs"] = round(bandwidth / 1e9, 2)
    return info


def memory_probe_mib() -> int:
    """MiB a memory-bandwidth probe streams so the caches cannot hold it: twice the last-level cache
    (st_sdk.hardware.last_level_cache_bytes), at least 512, at most an eighth of the RAM."""
    hw = probe()
    llc = last_level_cache_bytes() or 0
    mib = max(512, -(-2 * llc // 2**20))
    return min(mib, max(512, (hw.ram_bytes or 0) // 8 // 2**20))


def read_bandwidth(threads: int = 1, mib: int | None = None, repeats: int = 7) -> float:
    """Measured memory read bandwidth in bytes/s: `threads` threads each scanning their slice of an
    array far larger than the caches (numpy releases the GIL); median of `repeats`. The scan is
    `count_nonzero` over 64-bit words, the cheapest SIMD loop numpy has (a float sum is compute-bound
    near 12 GB/s per core): still a plain stream, so tuned kernels can beat it by a little. The array is
    `mib` MiB, by default `memory_probe_mib()`: twice the last-level cache, at least 512 MiB, since a
    large L3 keeps part of an array that fits in it between two scans."""
    mib = mib or memory_probe_mib()
    n = mib * 2**20 // 8
    a = np.ones(n, np.uint64)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [a[bounds[i]:bounds[i + 1]] for i in range(threads)]

    def run():
        if threads == 1:
            np.count_nonzero(slices[0])
            return
        ts = [threading.Thread(target=np.count_nonzero, args=(s,)) for s in slices]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    run()   # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return a.nbytes / median(times)
