"""Anonymous memory for weights: committing the expert cache's memory ahead of its first reads, and
asking for huge pages.

The slots are anonymous memory whose pages the kernel commits on first touch. On some machines (virtual
ones above all) a first touch costs more than reading the expert from disk: filling a 6.5 GiB cache
took the 21b-a3b's first ~40 tokens at 2 tok/s. `commit_in_background` faults the pages in from a
background thread with MADV_POPULATE_WRITE (Linux 5.14 and later), a piece at a time, in the time the
first tokens spend waiting for reads. The pages are the plan's own (the budget holds them), it never
writes to them (contents already read stay), and it stops when asked (the cache shrinking or closing).
Elsewhere it does nothing.

The kernels stream weights from the expert cache's slots and from the C backend's repacked copies;
both ask for transparent huge pages (`anonymous(..., huge=True)`, `Arena`), so a TLB entry covers 2 MiB
of weights instead of 4 KiB.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import sys
import threading

import numpy as np

log = logging.getLogger("st_sdk")

MADV_POPULATE_WRITE = 23   # linux/mman.h
PIECE = 32 << 20           # bytes a call: the stop flag is checked between pieces


def commit_in_background(buffer: np.ndarray) -> threading.Event:
    """Start faulting in `buffer`'s pages (page-aligned anonymous memory); set the returned event to stop.
    The libc call runs without the GIL (ctypes releases it), so Python threads run meanwhile."""
    stop = threading.Event()
    madvise = _madvise()
    if madvise is None or buffer.nbytes == 0:
        stop.set()
        return stop
    addr, nbytes = buffer.ctypes.data, buffer.nbytes

    def run(held: np.ndarray) -> None:   # `held` keeps the memory mapped until this returns
        try:
            for start in range(0, nbytes, PIECE):
                if stop.is_set():
                    return
                if madvise(ctypes.c_void_p(addr + start), ctypes.c_size_t(min(PIECE, nbytes - start)),
                           MADV_POPULATE_WRITE) != 0:
                    log.debug("st-sdk: MADV_POPULATE_WRITE refused (errno %d); expert slots commit as they "
                              "fill", ctypes.get_errno())
                    return
        finally:
            stop.set()

    threading.Thread(target=run, args=(buffer,), name="st-sdk-commit", daemon=True).start()
    return stop


@functools.lru_cache(maxsize=None)
def libc() -> ctypes.CDLL | None:
    """The C library, with errno kept (ctypes.get_errno); None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _madvise():
    try:
        fn = libc().madvise
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def anonymous(nbytes: int, huge: bool = False) -> mmap.mmap:
    """Page-aligned anonymous memory of this process alone (MAP_PRIVATE where the platform has it);
    `huge`: advised to use transparent huge pages (`advise_huge`)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
    else:
        m = mmap.mmap(-1, nbytes)
    if huge:
        advise_huge(m)
    return m


def advise_huge(m: mmap.mmap) -> bool:
    """MADV_HUGEPAGE on a mapping the kernels stream weights from: with 4 KiB pages every 4 KiB of a
    weight is a TLB miss, and on a virtual machine each miss walks two sets of page tables. Streaming
    a 1.33 MB Q4_0 matrix (decode's wq) on two threads took 270 us on 4 KiB pages and 83 us on 2 MiB
    ones (`python benchmarks/huge_pages.py`, benchmarks/README.md). Whether the kernel took the advice:
    False where the platform has no such advice or the kernel has no transparent huge pages. Taken, it
    still falls back to 4 KiB pages when they are set to `never` or no 2 MiB page is free.
    `ST_HUGE_PAGES=0` asks nothing."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(m, "madvise") or os.environ.get("ST_HUGE_PAGES", "1") == "0":
        return False
    try:
        m.madvise(advice)
    except OSError:
        return False
    return True


class Arena:
    """Copies of weights (repacked, or laid out for sparse ReGLU) packed into anonymous memory that starts on 2 MiB
    boundaries and asks for transparent huge pages: one 64 MiB mapping for many small tensors, its own
    for a large one. Only the pages written are committed, so a chunk's unused tail costs at most one
    huge page. The arrays it returns keep their mapping alive."""

    HUGE = 2 << 20
    CHUNK = 64 << 20

    def __init__(self):
        self.nbytes = 0       # bytes handed out
        self.huge = False     # whether the kernel took the huge-page advice
        self._chunk: np.ndarray | None = None
        self._used = 0

    def take(self, nbytes: int) -> np.ndarray:
        """`nbytes` uint8, 64-byte aligned, uninitialised."""
        self.nbytes += nbytes
        step = -(-nbytes // 64) * 64
        if step > self.CHUNK // 2:
            return self._map(nbytes)[:nbytes]
        if self._chunk is None or self._used + step > len(self._chunk):
            self._chunk, self._used = self._map(self.CHUNK), 0
        out = self._chunk[self._used:self._used + nbytes]
        self._used += step
        return out

    def _map(self, nbytes: int) -> np.ndarray:
        size = -(-nbytes // self.HUGE) * self.HUGE
        m = anonymous(size + self.HUGE)   # room to start on a 2 MiB boundary
        self.huge |= advise_huge(m)
        base = np.frombuffer(m, np.uint8)
        start = -base.ctypes.data % self.HUGE
        return base[start:start + size]


def resident_bytes() -> int:
    """This process's resident set (anonymous and file-backed pages), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0
