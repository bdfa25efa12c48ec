"""Pages of memory-mapped weight files: a backend that keeps a converted copy of a tensor drops the
file's pages of it from the process, so resident memory holds one copy, not two; a weight read a row at
a time is marked for random reads, so only the rows read come into memory."""
from __future__ import annotations

import numpy as np


def in_file_map(arr: np.ndarray) -> bool:
    """True when arr lives in a read-only file mapping (a GGUF opened by numpy.memmap mode 'r'): its
    pages can be dropped from this process and will refault, unchanged, from the file."""
    b = arr
    while b is not None:
        if isinstance(b, np.memmap):
            return b.mode == "r"
        b = getattr(b, "base", None)
    return False


def _inner_pages(arr: np.ndarray) -> tuple[int, int] | None:
    """[lo, hi): the whole pages inside arr when it lives in a read-only file map, else None."""
    import mmap

    if arr.nbytes < mmap.PAGESIZE or not in_file_map(arr):
        return None
    start = arr.ctypes.data
    lo = (start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = (start + arr.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    return (lo, hi) if hi > lo else None


def _advise(arr: np.ndarray, name: str) -> int:
    """madvise(advice `name` of the mmap module) on the whole pages inside a read-only file map;
    the bytes advised (0 when arr is not such a map or the advice is refused or unknown here)."""
    import ctypes
    import mmap

    pages, advice = _inner_pages(arr), getattr(mmap, name, None)
    if pages is None or advice is None:
        return 0
    lo, hi = pages
    if ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice) != 0:
        return 0
    return hi - lo


def release_map(arr: np.ndarray) -> int:
    """Drop the resident pages of a repacked source from this process (MADV_DONTNEED on a read-only
    file map), so the repacked copy does not double the resident memory; returns the bytes released.
    Anything else (anonymous memory, writable maps) is left alone. Pages read again later refault from
    the file (or the page cache)."""
    return _advise(arr, "MADV_DONTNEED")


def read_by_rows(arr: np.ndarray) -> int:
    """Mark a weight that is only ever read a row at a time (an embedding table) as read at random
    (MADV_RANDOM on a read-only file map): a row read faults in its own pages, not the kernel's
    read-around window. Returns the bytes that stay out of memory until their rows are read (0 when
    arr is not in a read-only file map: then it is resident as a whole)."""
    return _advise(arr, "MADV_RANDOM")
