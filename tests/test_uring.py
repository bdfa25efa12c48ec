"""Expert reads through io_uring (st_sdk.offload.uring): the bytes asked for, in the order the cache
needs them (the cache reading through it: tests/test_offload.py)."""
import errno
import os

import numpy as np
import pytest

from st_sdk.offload import uring

@pytest.fixture
def ring_or_skip():
    ring = uring.Ring.open()
    if ring is None:
        pytest.skip("io_uring is unavailable here")
    yield ring
    ring.close()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.bin"
    content = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    path.write_bytes(content.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield fd, content
    os.close(fd)


def test_ring_reads_the_ranges_asked_for(ring_or_skip, data):
    ring, (fd, content) = ring_or_skip, data
    rng = np.random.default_rng(1)
    n = 3 * ring.depth + 1   # more than enter the kernel at once
    offsets, lengths = rng.integers(0, len(content) - 5000, n), rng.integers(1, 5000, n)
    bufs = [np.zeros(int(length), np.uint8) for length in lengths]
    ring.read([(fd, buf.ctypes.data, int(length), int(off), tag)
               for tag, (buf, off, length) in enumerate(zip(bufs, offsets, lengths))])
    for tag in reversed(range(n)):   # waited for in any order
        assert ring.wait(tag) == lengths[tag]
        np.testing.assert_array_equal(bufs[tag], content[offsets[tag]:offsets[tag] + lengths[tag]])
    assert ring.in_flight == 0 and not ring.results


def test_reads_needed_now_enter_the_kernel_before_guesses(ring_or_skip, data):
    """A read for the layer being computed (urgent) and a guess that turned out needed (promoted) go
    ahead of the guesses still waiting."""
    ring, (fd, content) = ring_or_skip, data
    buf = np.zeros(4096 * (3 * ring.depth + 2), np.uint8)
    guesses = [(fd, buf.ctypes.data + 4096 * i, 4096, 4096 * i, i) for i in range(3 * ring.depth)]
    ring.read(guesses)
    urgent = 3 * ring.depth
    ring.read([(fd, buf.ctypes.data + 4096 * urgent, 4096, 0, urgent)], urgent=True)
    ring.promote({2 * ring.depth + 1})
    assert [r[4] for r in ring._waiting][:2] == [2 * ring.depth + 1, urgent]
    ring.drain()
    assert len(ring.results) == 3 * ring.depth + 1 and set(ring.results.values()) == {4096}
    np.testing.assert_array_equal(buf[:4096 * urgent], content[:4096 * urgent])


def test_a_failed_read_gives_its_errno(ring_or_skip):
    ring = ring_or_skip
    buf = np.zeros(16, np.uint8)
    bad = os.open(os.devnull, os.O_RDONLY)
    os.close(bad)   # a descriptor no longer open
    ring.read([(bad, buf.ctypes.data, 16, 0, 7)])
    assert ring.wait(7) == -errno.EBADF


def test_turned_off_it_opens_no_ring(monkeypatch):
    monkeypatch.setenv("ST_OFFLOAD_URING", "0")
    assert uring.Ring.open() is None


def test_a_ring_dropped_without_close_closes_its_descriptor(ring_or_skip):
    import gc

    ring = uring.Ring.open()
    fd = ring.fd
    os.fstat(fd)
    del ring
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("ring", ["io_uring", "pread"])
def test_read_cost_benchmark_reads_the_bytes_it_picks(tmp_path, monkeypatch, ring):
    """benchmarks/read_cost.py's reader: each read puts the file's bytes at the offset it picked into its
    buffer, through io_uring or, where there is none, pread."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import read_cost

    if ring == "pread":
        monkeypatch.setenv("ST_OFFLOAD_URING", "0")
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    path = tmp_path / "file.bin"
    data.tofile(path)
    try:
        reader = read_cost.Reader(str(path), 40_000)   # rounded up to whole 4 KiB pages
    except OSError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    try:
        if ring == "io_uring" and reader.ring is None:
            pytest.skip("io_uring unavailable here")
        assert (reader.ring is None) == (ring == "pread") and reader.size == 40_960
        buffers = np.frombuffer(reader.buffers, np.uint8).reshape(8, reader.size)
        for _ in range(10):
            reader.read_one()
            slot, offset = reader.last
            np.testing.assert_array_equal(buffers[slot], data[offset:offset + reader.size])
    finally:
        reader.close()
