"""Weights' copies on huge pages (st_sdk/offload/pages.py, Arena): the kernels stream them, and with
4 KiB pages every 4 KiB is a TLB miss."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from smaps import vm_flags
from st_sdk.offload.pages import Arena, anonymous

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def test_arena_hands_out_aligned_separate_buffers_and_maps_large_ones_alone():
    arena = Arena()
    sizes = [100, 5000, 1 << 20, 3, 40 << 20, 70_000]
    bufs = [arena.take(n) for n in sizes]
    assert [b.nbytes for b in bufs] == sizes and arena.nbytes == sum(sizes)
    for i, b in enumerate(bufs):
        assert b.dtype == np.uint8 and b.flags.writeable
        assert b.ctypes.data % 64 == 0
        b[:] = i + 1
    for i, b in enumerate(bufs):   # nothing written through one buffer shows in another
        assert (b == i + 1).all()
        assert not any(np.shares_memory(b, o) for o in bufs[i + 1:])
    big = bufs[sizes.index(40 << 20)]   # over half a chunk: its own mapping, on a 2 MiB boundary
    assert big.ctypes.data % Arena.HUGE == 0
    small = [b for n, b in zip(sizes, bufs) if n <= Arena.CHUNK // 2]
    assert max(b.ctypes.data for b in small) - min(b.ctypes.data for b in small) < Arena.CHUNK   # one chunk


@linux_only
def test_arena_and_huge_anonymous_memory_carry_the_huge_page_advice():
    """Whether the kernel then grants huge pages depends on its free memory; the advice itself is
    the mapping's flag ("hg" in smaps) whenever madvise took it."""
    arena = Arena()
    buf = arena.take(1 << 20)
    buf[:] = 1
    assert ("hg" in vm_flags(buf.ctypes.data)) == arena.huge
    plain = np.frombuffer(anonymous(4 << 20), np.uint8)
    plain[:] = 1
    assert "hg" not in vm_flags(plain.ctypes.data)
    advised = np.frombuffer(anonymous(4 << 20, huge=True), np.uint8)
    advised[:] = 1
    assert ("hg" in vm_flags(advised.ctypes.data)) == arena.huge


@linux_only
def test_c_backend_keeps_its_repacked_weights_in_its_arena(tmp_path):
    import st_sdk
    from st_sdk.synth import write_model

    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=0)["gguf"]
    m = st_sdk.load(path, backend="c")
    d = m.backend.describe()
    if d["variant"] not in ("avx2", "avx512"):
        pytest.skip("the generic variant does not repack")
    assert d["repacked_weight_bytes"] > 0
    assert m.backend.arena.nbytes == d["repacked_weight_bytes"]
    assert d["huge_page_weight_bytes"] == (d["repacked_weight_bytes"] if m.backend.arena.huge else 0)
    for param in (m.params.layers[0].wq, m.params.layers[0].gate):
        data = param.value.data if hasattr(param.value, "data") else param.value.arrays[0]
        assert ("hg" in vm_flags(data.ctypes.data)) == m.backend.arena.huge, param.raw.name
