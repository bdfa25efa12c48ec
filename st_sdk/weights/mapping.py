"""Pages of memory-mapped weight files: a backend that keeps a converted copy of a tensor drops the
file's pages of it from the process, so resident memory holds one copy, not two."""
from __future__ import annotations

import numpy as np


def _read_only_file_map(arr: np.ndarray) -> bool:
    """True when arr lives in a read-only file mapping (a GGUF opened by numpy.memmap mode 'r'): its
    pages can be dropped from this process and will refault, unchanged, from the file."""
    b = arr
    while b is not None:
        if isinstance(b, np.memmap):
            return b.mode == "r"
        b = getattr(b, "base", None)
    return False


def release_map(arr: np.ndarray) -> int:
    """Drop the resident pages of a repacked source from this process (MADV_DONTNEED on a read-only
    file map), so the repacked copy does not double the resident memory; returns the bytes released.
    Anything else (anonymous memory, writable maps) is left alone."""
    import mmap

    if arr.nbytes < mmap.PAGESIZE or not _read_only_file_map(arr) or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    start = arr.ctypes.data
    lo = (start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE   # whole pages inside arr only
    hi = (start + arr.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED) != 0:
        return 0
    return hi - lo
