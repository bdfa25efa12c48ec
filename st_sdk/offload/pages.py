"""Committing the expert cache's memory ahead of its first reads.

The slots are anonymous memory whose pages the kernel commits on first touch. On some machines (virtual
ones above all) a first touch costs more than reading the expert from disk: filling a 6.5 GiB cache
took the 21b-a3b's first ~40 tokens at 2 tok/s. `commit_in_background` faults the pages in from a
background thread with MADV_POPULATE_WRITE (Linux 5.14 and later), a piece at a time, in the time the
first tokens spend waiting for reads. The pages are the plan's own (the budget holds them), it never
writes to them (contents already read stay), and it stops when asked (the cache shrinking or closing).
Elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
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


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def anonymous(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory of this process alone (MAP_PRIVATE where the platform has it)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
    return mmap.mmap(-1, nbytes)


def resident_bytes() -> int:
    """This process's resident set (anonymous and file-backed pages), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0
