"""Expert reads through Linux's io_uring, with no I/O threads: the compute thread queues each read and
the kernel carries it out (O_DIRECT, straight into the slot) while the compute goes on.

With a pool of I/O threads, every piece read wakes a thread that then takes the GIL and a core from
the compute threads (about 10 ms of CPU a token on the 21b-a3b at 8 GiB on two cores). Here a read
costs one system call to queue it and a look at the completion ring: `Ring` is the ring itself
(`io_uring_setup`, the rings mapped with mmap, `io_uring_enter`), driven through ctypes and memoryviews
of the mapped rings, so nothing is compiled. Used for the prepared expert file's direct reads
(`ExpertCache.use_file`); `Ring.open()` returns None where io_uring is missing or refused (kernels
before 5.6, seccomp, `kernel.io_uring_disabled`), and the cache then keeps its threads.
ST_OFFLOAD_URING=0 turns it off.

One thread at a time drives a ring (the cache's steps are serialised; see ExpertCache), so it takes
no lock. The completion ring is read only after an `io_uring_enter` call (a full barrier) or on
x86-64, whose stores the kernel's publish in order.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import struct
import weakref
from collections import deque

import numpy as np

log = logging.getLogger("st_sdk.offload")

SYS_IO_URING_SETUP, SYS_IO_URING_ENTER = 425, 426   # the same on every Linux architecture since 5.1
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_ENTER_GETEVENTS = 1
IORING_FEAT_SINGLE_MMAP = 1
IORING_OP_READ = 22                                  # Linux 5.6
ENTRIES = 256                                        # submission entries (completions: twice as many)
DEPTH = 8                                            # reads in the kernel at once; the rest wait their turn

# struct io_uring_params: 10 u32, then the sq and cq offsets (9 u32 + 1 u64 each)
PARAMS = np.dtype([("sq_entries", "<u4"), ("cq_entries", "<u4"), ("flags", "<u4"), ("sq_thread_cpu", "<u4"),
                   ("sq_thread_idle", "<u4"), ("features", "<u4"), ("wq_fd", "<u4"), ("resv", "<u4", 3),
                   ("sq", "<u4", 10), ("cq", "<u4", 10)])
SQ_TAIL, SQ_MASK, SQ_ARRAY = 1, 2, 6                # indices into io_sqring_offsets
CQ_HEAD, CQ_TAIL, CQ_MASK, CQ_CQES = 0, 1, 2, 5      # indices into io_cqring_offsets
# struct io_uring_sqe as a read uses it: opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data,
# then padding; struct io_uring_cqe: user_data, res, flags. Written and read on the mapped rings with
# `struct` (a NumPy record costs microseconds an entry)
SQE = struct.Struct("<BBHiQQIIQ24x")
CQE = struct.Struct("<Qi4x")
assert PARAMS.itemsize == 120 and SQE.size == 64 and CQE.size == 16
_SQE_PACK, _CQE_UNPACK = SQE.pack_into, CQE.unpack_from


class Ring:
    """An io_uring instance for reads: `read` queues reads and hands them to the kernel as room allows,
    `reap` collects finished ones (tag -> bytes read, or -errno) into `results`, `wait` blocks until
    a given read has finished, `drain` until all have."""

    def __init__(self, fd: int, params: np.ndarray, syscall):
        self.fd, self._syscall = fd, syscall
        self._close_fd = weakref.finalize(self, os.close, fd)   # a ring dropped without close() closes too
        p = params[0]
        sq_size = int(p["sq"][SQ_ARRAY]) + int(p["sq_entries"]) * 4
        cq_size = int(p["cq"][CQ_CQES]) + int(p["cq_entries"]) * CQE.size
        self._maps = []
        if int(p["features"]) & IORING_FEAT_SINGLE_MMAP:
            sq = cq = self._map(max(sq_size, cq_size), IORING_OFF_SQ_RING)
        else:
            sq, cq = self._map(sq_size, IORING_OFF_SQ_RING), self._map(cq_size, IORING_OFF_CQ_RING)
        # the rings as memoryviews, their entries written and read with SQE and CQE
        self._sqes = memoryview(self._map(int(p["sq_entries"]) * SQE.size, IORING_OFF_SQES))
        sq32, cq32 = memoryview(sq).cast("I"), memoryview(cq).cast("I")
        self._sq_tail_at = int(p["sq"][SQ_TAIL]) // 4
        self._sq_mask = sq32[int(p["sq"][SQ_MASK]) // 4]
        self._sq_array_at = int(p["sq"][SQ_ARRAY]) // 4
        self._cq_head_at, self._cq_tail_at = int(p["cq"][CQ_HEAD]) // 4, int(p["cq"][CQ_TAIL]) // 4
        self._cq_mask = cq32[int(p["cq"][CQ_MASK]) // 4]
        self._cqes_at = int(p["cq"][CQ_CQES])
        self._sq32, self._cq32, self._cq = sq32, cq32, memoryview(cq)
        self.depth = min(DEPTH, int(p["sq_entries"]))   # reads in the kernel at once, at most
        self._waiting: deque = deque()          # reads not yet in the ring, first come first served
        self._queued = 0                        # in the ring, not yet submitted
        self.in_flight = 0                      # in the ring (submitted or not), not yet reaped
        self.results: dict[int, int] = {}       # tag -> result, until its reader takes it
        self.reaped = 0                         # reads reaped so far (a result can appear only with one more)
        self.deferred = False                   # `read` leaves the queued reads for the next `submit`
        self._ordered = platform.machine().lower() in ("x86_64", "amd64")

    @classmethod
    def open(cls, entries: int = ENTRIES) -> "Ring | None":
        """A ring, or None (logged at debug level) where io_uring is unavailable or turned off."""
        from .pages import libc

        if os.environ.get("ST_OFFLOAD_URING", "1").strip() == "0" or libc() is None:
            return None
        syscall = libc().syscall
        syscall.restype = ctypes.c_long
        params = np.zeros(1, PARAMS)
        fd = syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(entries), ctypes.c_void_p(params.ctypes.data))
        if fd < 0:
            log.debug("st-sdk: io_uring unavailable (%s); expert reads use I/O threads", os.strerror(ctypes.get_errno()))
            return None
        try:
            ring = cls(fd, params, syscall)   # from here on the ring owns fd (closed with it, or when dropped)
        except OSError as e:
            log.debug("st-sdk: io_uring's rings could not be mapped (%s); expert reads use I/O threads", e)
            return None
        try:
            ring._probe()
        except OSError as e:
            log.debug("st-sdk: io_uring refused a read (%s); expert reads use I/O threads", e)
            ring.close()
            return None
        return ring

    def _map(self, size: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return m

    def _probe(self) -> None:
        """One read of /dev/zero: kernels before 5.6 answer IORING_OP_READ with EINVAL."""
        buf = np.zeros(8, np.uint8)
        fd = os.open("/dev/zero", os.O_RDONLY)
        try:
            self.read([(fd, buf.ctypes.data, 8, 0, 0)])
            res = self.wait(0)
        finally:
            os.close(fd)
        if res != 8:
            raise OSError(-res if res < 0 else 0, os.strerror(-res) if res < 0 else f"read {res} of 8 bytes")

    # ---- reads --------------------------------------------------------------------------
    def read(self, reads: list[tuple[int, int, int, int, int]], urgent: bool = False) -> None:
        """Queue reads (fd, addr, length, offset, tag): `length` bytes at `offset` of `fd` into memory at
        `addr` (kept alive by the caller until its result is reaped). Reads enter the kernel `depth` at
        a time, in the order they were asked for, `urgent` ones before all that wait: a read needed
        now then waits behind fewer others than if all were in flight at once, sharing the disk. While
        `deferred`, they are handed to the kernel by the next `submit` (or wait), so that one system
        call queues the reads a layer asks for together."""
        if urgent:
            self._waiting.extendleft(reversed(reads))
        else:
            self._waiting.extend(reads)
        self._fill()
        if not self.deferred:
            self.submit()

    def promote(self, tags: set[int]) -> None:
        """Move the waiting reads of `tags` (a guess that is now needed) before all other waiting ones."""
        if self._waiting and tags:
            first = [r for r in self._waiting if r[4] in tags]
            if first:
                rest = [r for r in self._waiting if r[4] not in tags]
                self._waiting = deque(first + rest)

    def _fill(self) -> None:
        sq32 = self._sq32
        while self._waiting and self.in_flight < self.depth:
            fd, addr, length, offset, tag = self._waiting.popleft()
            tail = sq32[self._sq_tail_at]
            i = tail & self._sq_mask
            _SQE_PACK(self._sqes, i * SQE.size, IORING_OP_READ, 0, 0, fd, offset, addr, length, 0, tag)
            sq32[self._sq_array_at + i] = i
            sq32[self._sq_tail_at] = (tail + 1) & 0xFFFFFFFF
            self._queued += 1
            self.in_flight += 1

    def submit(self) -> None:
        """Hand the queued reads to the kernel."""
        while self._queued:
            n = self._enter(self._queued, 0, 0)
            self._queued -= n

    def reap(self) -> int:
        """Collect finished reads into `results`; returns how many."""
        if not self._ordered:
            self._enter(0, 0, IORING_ENTER_GETEVENTS)   # a full barrier before the ring is read
        cq32 = self._cq32
        head, tail = cq32[self._cq_head_at], cq32[self._cq_tail_at]
        n = (tail - head) & 0xFFFFFFFF
        for j in range(n):
            tag, res = _CQE_UNPACK(self._cq, self._cqes_at + ((head + j) & self._cq_mask) * CQE.size)
            self.results[tag] = res
        if n:
            cq32[self._cq_head_at] = tail
            self.in_flight -= n
            self.reaped += n
            if self._waiting:
                self._fill()
                self.submit()
        return n

    def wait(self, tag: int) -> int:
        """Block until read `tag` has finished; its result (bytes read, or -errno), taken."""
        while tag not in self.results:
            self._fill()
            self.submit()
            if not self.reap() and tag not in self.results:
                if not self.in_flight:
                    raise OSError(0, f"io_uring: read {tag} was never asked for")
                self._enter(0, 1, IORING_ENTER_GETEVENTS)
        return self.results.pop(tag)

    def drain(self) -> None:
        """Wait for every read asked for (their buffers may then be freed)."""
        while self.in_flight or self._waiting:
            self._fill()
            self.submit()
            self._enter(0, 1, IORING_ENTER_GETEVENTS)
            self.reap()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.drain()
        except OSError:
            pass
        for view in (self._sqes, self._sq32, self._cq32, self._cq):
            view.release()
        self._sqes = self._sq32 = self._cq32 = self._cq = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:   # a view still exported: the mapping goes with the last view
                pass
        self._maps.clear()
        self._close_fd()
        self.fd = -1

    def _enter(self, to_submit: int, min_complete: int, flags: int) -> int:
        """io_uring_enter (ctypes releases the GIL meanwhile); OSError on failure, EINTR retried."""
        while True:
            n = self._syscall(ctypes.c_long(SYS_IO_URING_ENTER), ctypes.c_uint(self.fd), ctypes.c_uint(to_submit),
                              ctypes.c_uint(min_complete), ctypes.c_uint(flags), ctypes.c_void_p(0), ctypes.c_size_t(0))
            if n >= 0:
                return int(n)
            err = ctypes.get_errno()
            if err != 4:   # EINTR
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
