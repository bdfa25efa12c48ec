"""How the expert cache reads (st_sdk.offload.cache.ExpertCache reads through these methods): from the
model file, converted to a backend's layout where it has one, on the cache's I/O threads; from a
prepared expert file, straight into the slot, through io_uring where the kernel allows it
(st_sdk.offload.uring) and else on the I/O threads. O_DIRECT where the filesystem allows it."""
from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..errors import WeightError
from .pages import anonymous

Key = tuple[int, int]   # (layer, expert)
DIRECT_ALIGN = 4096     # O_DIRECT reads: file offset, length and buffer aligned to this


def _close_files(fds: dict, direct_fds: dict, refused_fds: list) -> None:
    for fd in [*fds.values(), *direct_fds.values(), *refused_fds]:
        if fd is not None:
            os.close(fd)
    fds.clear()
    direct_fds.clear()
    refused_fds.clear()


def expert_ids(picks) -> list[int]:
    """Expert ids of any array of picks, as Python ints (one conversion, not one per id); a list of
    ints is returned as it is."""
    if type(picks) is list and (not picks or type(picks[0]) is int):
        return picks
    return np.ravel(picks).astype(np.int64, copy=False).tolist()


@dataclass(frozen=True)
class Extent:
    """Bytes [offset, offset + nbytes) of `path`."""
    path: str
    offset: int
    nbytes: int


def file_extent(arr: np.ndarray, what: str) -> Extent:
    """Where a memory-mapped array's bytes lie in its file."""
    base = arr
    while base is not None and not hasattr(base, "_mmap"):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is None or getattr(base, "filename", None) is None:
        raise WeightError(f"{what}: max_memory needs weights read from a model file (this tensor is in memory)")
    if not arr.flags.c_contiguous:
        raise WeightError(f"{what}: expert storage is not contiguous in its file")
    start = base.offset - base.offset % mmap.ALLOCATIONGRANULARITY
    mapped = np.frombuffer(mm, dtype=np.uint8)
    return Extent(str(base.filename), int(arr.ctypes.data - mapped.ctypes.data + start), int(arr.nbytes))


class ExpertReads:
    """The reading half of ExpertCache (it sets the attributes these use: `_fds`, `_direct_fds`,
    `_refused_fds`, `_scratch`, `_lock`, `_ring`, `_tags`, `prepared`, `buffer`, `stats`...)."""

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise WeightError(f"{path}: cannot open the model file to read experts ({e.strerror})") from None
            if self.direct:
                try:
                    self._direct_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError:   # a filesystem without O_DIRECT (tmpfs): read through the page cache
                    self._direct_fds[path] = None
        return fd

    def _buffer(self, nbytes: int) -> memoryview:
        """This I/O thread's read buffer of at least `nbytes` (page-aligned: an anonymous mapping)."""
        mm = getattr(self._scratch, "mm", None)
        if mm is None or len(mm) < nbytes:
            mm = self._scratch.mm = anonymous(-(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        return memoryview(mm)

    def _pread(self, ext: Extent, key: Key, out: np.ndarray | None) -> np.ndarray:
        """The extent's bytes: read into `out` when given (buffered reads, or direct ones whose extent
        and `out` are aligned), else into this thread's buffer, and returned. O_DIRECT when the file
        allows it: whole aligned blocks around the extent."""
        fd = self._fd(ext.path)
        dfd = self._direct_fds.get(ext.path)
        if dfd is not None:
            start = ext.offset - ext.offset % DIRECT_ALIGN
            pad = ext.offset - start
            length = -(-(pad + ext.nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
            into = (out is not None and pad == 0 and length == ext.nbytes and out.nbytes == length
                    and out.ctypes.data % DIRECT_ALIGN == 0)
            buf = memoryview(out) if into else self._buffer(length)
            try:
                got = os.preadv(dfd, [buf[:length]], start) - pad
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise WeightError(f"{ext.path}: cannot read expert {key} ({e.strerror})") from None
                # refused after all (alignment): read through the page cache from now on; the descriptor
                # stays open until close(), as another I/O thread may be reading with it
                self._direct_fds[ext.path] = None
                self._refused_fds.append(dfd)
                return self._pread(ext, key, out)
            if got >= ext.nbytes:
                return out if into else np.frombuffer(buf, np.uint8, ext.nbytes, pad)
        else:
            target = memoryview(out) if out is not None else self._buffer(ext.nbytes)[:ext.nbytes]
            try:
                got = os.preadv(fd, [target], ext.offset)
            except OSError as e:
                raise WeightError(f"{ext.path}: cannot read expert {key} ({e.strerror})") from None
            if self.drop_page_cache:
                os.posix_fadvise(fd, ext.offset, ext.nbytes, os.POSIX_FADV_DONTNEED)
            if got == ext.nbytes:
                return out if out is not None else np.frombuffer(target, np.uint8)
        raise WeightError(f"{ext.path}: short read of expert {key} ({max(got, 0)} of {ext.nbytes} bytes): "
                          "is the file truncated?")

    def _read(self, key: Key, slot: int, part: int) -> None:
        """Read one part of an expert into its slot (I/O thread; the parts are read in parallel),
        converted to its layout if it has one."""
        layer = key[0]
        self._fill(key, part, self._views(slot, layer)[part])
        self._counted(int(self.part_bytes[layer][part]), part == 0)

    def hold_reads(self) -> None:
        """Reads started from now until `submit_reads` enter the kernel together, with one system call
        (io_uring; the I/O threads start each read at once)."""
        if self._ring is not None:
            self._ring.deferred = True

    def submit_reads(self) -> None:
        if self._ring is not None:
            self._ring.deferred = False
            self._ring.submit()

    def _counted(self, nbytes: int, first: bool) -> None:
        """A piece of an expert was read (any thread): its bytes, and one read for an expert's first piece."""
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.reads += first

    def _fill(self, key: Key, part: int, view: np.ndarray) -> None:
        """Read one part of an expert from the model file into `view`, converted to its layout if it
        has one (the slot's bytes, or a prepared expert file's record)."""
        ext, lay = self.locate(*key)[part], self.layouts[key[0]][part]
        src = self._pread(ext, key, view if lay is None else None)
        if lay is not None:
            lay.convert(src, view)
        elif src is not view:
            view[:] = src

    def _prepared_at(self, key: Key) -> tuple[str, int]:
        """The prepared expert file, and where expert `key` starts in it."""
        path, base, experts = self.prepared
        layer, e = key
        return path, base + (layer * experts + e) * self._stride

    def _ring_read(self, key: Key, slot: int, cuts: list[tuple[int, int]], urgent: bool) -> RingReads:
        """Queue an expert's pieces [a, b) on the io_uring ring, straight into its slot."""
        path, start = self._prepared_at(key)
        fd, addr = self._direct_fds[path], self._base + slot * self._stride
        pieces = []
        for a, b in cuts:
            self._tags += 1
            pieces.append((self._tags, a, b))
        self._ring.read([(fd, addr + a, b - a, start + a, tag) for tag, a, b in pieces], urgent)
        return RingReads(self, key, slot, pieces)

    def _read_prepared(self, key: Key, slot: int, a: int, b: int) -> None:
        """Read bytes [a, b) of an expert from the prepared expert file straight into its slot (I/O
        thread)."""
        path, start = self._prepared_at(key)
        out = self.buffer[slot, a:b]
        src = self._pread(Extent(path, start + a, b - a), key, out)
        if src is not out:
            out[:] = src
        self._counted(b - a, a == 0)


class Reads:
    """The reads of one expert's parts, waited for as one."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def needed(self) -> None:
        """The expert is needed now (the I/O threads' queue has no order to change)."""

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self) -> None:
        for f in self.futures:
            f.result()


class RingReads:
    """The ring's reads of one expert's pieces from a prepared expert file, waited for as one (with
    `Reads`' `done` and `result`). A piece the ring failed or read short is read again the threads' way
    (`ExpertCache._read_prepared`), which falls back from O_DIRECT or names the error."""

    def __init__(self, cache, key: Key, slot: int, pieces: list[tuple[int, int, int]]):
        self.cache, self.key, self.slot = cache, key, slot
        self.pieces = pieces          # (tag, a, b): bytes [a, b) of the expert
        self.results: dict[int, int] = {}
        self.error: BaseException | None = None
        self.finished = False

    def needed(self) -> None:
        """The expert is needed now: its pieces still waiting go first."""
        if not self.finished:
            self.cache._ring.promote({tag for tag, _, _ in self.pieces})

    def done(self) -> bool:
        if self.finished:
            return True
        ring = self.cache._ring
        for tag, _, _ in self.pieces:
            if tag not in self.results:
                res = ring.results.pop(tag, None)
                if res is None:
                    return False
                self.results[tag] = res
        return True

    def result(self) -> None:
        if not self.finished:
            if any(tag not in self.results for tag, _, _ in self.pieces):
                self.needed()
            self.finished = True
            cache = self.cache
            cache._looked_at = -1   # finished without a reap of the ring, maybe: _settle looks again
            try:
                for tag, a, b in self.pieces:
                    try:
                        res = self.results.pop(tag) if tag in self.results else cache._ring.wait(tag)
                    except OSError:   # the ring failed: read the piece again below
                        res = -1
                    if res == b - a:
                        cache._counted(b - a, a == 0)
                    else:
                        cache._read_prepared(self.key, self.slot, a, b)
            except BaseException as e:
                self.error = e
        if self.error is not None:
            raise self.error
