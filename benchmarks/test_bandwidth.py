"""The memory read bandwidth probe behind every "fraction of the bandwidth limit" figure: the
threads the run uses summing a 512 MiB array (far beyond the caches)."""
from __future__ import annotations

from st_sdk.bench import read_bandwidth


def test_read_bandwidth(benchmark, threads):
    benchmark.group = "memory read bandwidth"
    bw = benchmark.pedantic(read_bandwidth, kwargs=dict(threads=threads, repeats=3), rounds=3, iterations=1)
    benchmark.extra_info.update(threads=threads, gb_per_s=round(bw / 1e9, 2))
    assert bw > 1e8   # below 100 MB/s the probe, not the machine, is broken
