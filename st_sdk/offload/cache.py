"""The cross-layer expert cache: preallocated slots, filled by I/O threads reading the model file with
O_DIRECT where the filesystem allows it (no page cache, no kernel copy: on a small machine the
compute threads keep the CPU), else with pread and the page cache dropped behind each read so it
does not double the memory. A backend may ask for experts in its own layout (Backend.expert_layout):
each is converted on the I/O thread that read it. Experts read from a prepared expert file (already
in that layout, `use_file`) go through io_uring instead where the kernel allows it (st_sdk.offload.uring):
no thread is woken per read, and reads needed now go before guesses.

Eviction policies (`policy=`):
  lru   the least recently used expert goes.
  lfru  frequency-aware: of the resident experts not held for the step being computed, the one used
        least often goes, the least recent of equals first (uses counted over the whole run, resident
        or not, and halved every `AGE_EVERY` uses per slot so the counts follow the text). No slots
        are set aside for recency: protecting the most recent quarter read 4-17% more experts on every
        routing replayed (docs/memory_budget.md, "Cache policy").
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..errors import InputError, WeightError
from .pages import anonymous, commit_in_background, resident_bytes
from .reads import DIRECT_ALIGN, ExpertReads, Extent, Key, Reads, _close_files, expert_ids
from .stats import OffloadStats
from .uring import Ring
from .uses import UseCounts

log = logging.getLogger("st_sdk.offload")

POLICIES = ("lfru", "lru")


class ExpertCache(ExpertReads, UseCounts):
    """Cache of whole experts (gate + up + down), in `slots` preallocated bundles.

    `part_bytes[layer]` are the stored sizes of a layer's gate, up and down: they differ between layers
    when a file mixes types per layer (llama.cpp's q4_k_m stores some layers' ffn_down as q6_k), so a
    slot holds the largest layer's bundle and each layer's parts lie at its own offsets in it.
    Called from the compute thread only (`prefetch`, `get`); reads run on `io_threads` threads, or
    through io_uring (see `use_file`).
    Experts prefetched for the layer being computed are held (never evicted) until the next layer's
    prefetch releases them."""

    def __init__(self, locate: Callable[[int, int], list[Extent]], part_bytes: list[list[int]], slots: int,
                 io_threads: int = 4, drop_page_cache: bool = True, files: tuple[str, ...] = (),
                 policy: str = "lfru", direct: bool | None = None, experts: int | None = None):
        if policy not in POLICIES:
            raise InputError(f"cache_policy={policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self._new_uses(len(part_bytes), int(experts or 0))   # st_sdk.offload.uses
        self.locate = locate
        self.part_bytes = part_bytes          # each layer's gate, up and down as stored in the file
        self.layouts: list[list] = [[None] * len(parts) for parts in part_bytes]   # see set_layouts
        self._layout_offsets()
        self._allocate(slots)
        self.lru: OrderedDict[Key, int] = OrderedDict()   # resident, least recent first
        self.pending: dict[Key, tuple[int, Reads]] = {}
        self.held: set[Key] = set()
        # where each expert is, for a backend that reads its slots itself: table[layer, e] is its slot
        # while resident (in lru), -2 while read (in pending), else -1; None without `experts` per layer
        self.table = None if experts is None else np.full((len(part_bytes), int(experts)), -1, np.int32)
        self.minimum_slots = 2
        self.lookahead = None   # st_sdk.offload.experts.Lookahead, when reads ahead across layers are on
        self.limit: int | None = None   # keep_within: the process's resident bytes the cache keeps below
        self.row_maps: list[np.ndarray] = []   # weights read by rows off the file map, dropped first (keep_within)
        self.shrunk = 0                 # slots given back at run time
        self._released: list[int] = []  # ...their indices, taken back while there is room again
        self.reserved: dict[object, int] = {}   # bytes callers are about to allocate, counted by keep_within
        self.stats = OffloadStats()
        self.prepared: tuple[str, int, int] | None = None   # see use_file
        self._committing = threading.Event()   # set to stop the background commit (see commit)
        self.victim_batch = 16          # lfru: victims chosen at once, at most
        self.warmed = 0                 # experts read into the slots at load (warm)
        # writes lfru's counts where the next load finds them (offload.profile): at exit, and when aged
        self.keep_counts: Callable[[], None] | None = None
        self.counts_file = None   # where they are kept (a Path), once offload.profile attached them
        self.live_seen: Callable[[], list] | None = None   # each layer's live share so far, kept with them
        self.layouts_chosen: tuple[str, list] | None = None   # (backend, layouts) chosen from kept shares
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        if direct is None:   # ST_OFFLOAD_DIRECT=0 reads through the page cache (to compare)
            direct = os.environ.get("ST_OFFLOAD_DIRECT", "1").strip() != "0"
        self.direct = direct and hasattr(os, "O_DIRECT")   # False once a file refuses it
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}
        self._refused_fds: list[int] = []   # O_DIRECT descriptors a filesystem refused reads through
        # a cache dropped without close() (a model let go) still closes its files
        self._close_files = weakref.finalize(self, _close_files, self._fds, self._direct_fds, self._refused_fds)
        self._scratch = threading.local()   # each I/O thread's aligned read buffer
        for path in files:   # opened now: a file deleted or renamed over later is still read whole
            self._fd(path)
        self.io_threads = io_threads
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="st-sdk-io")
        self._lock = threading.Lock()   # guards stats updated from I/O threads
        self._ring = None               # the prepared file's direct reads through io_uring (see use_file)
        self._looked_at = -1            # the ring's reaped count when _settle last looked at the pending reads
        self._tags = 0

    # ---- public ---------------------------------------------------------------------------
    def prefetch(self, layer: int, experts) -> None:
        """Start reading the experts a layer's router picked; release the previous layer's."""
        self.held.clear()
        for e in dict.fromkeys(expert_ids(experts)):
            key = (layer, e)
            if len(self.held) >= self.slots - 1:
                break   # a long prefill picks more experts than fit: the rest load on demand
            self.held.add(key)
            if key in self.pending:
                self.pending[key][1].needed()
                continue
            if key in self.lru:
                continue
            if self._start_read(key) is None:
                self.held.discard(key)
                break
            self._prefetched[key] = 1

    def prefetch_ahead(self, layer: int, experts) -> None:
        """Start reading experts a later layer will probably pick (a guess: nothing is held for it, and
        a slot is taken only from what is free or evictable). At most `slots // 4` in flight this way."""
        for e in dict.fromkeys(expert_ids(experts)):
            key = (layer, e)
            if key in self.lru or key in self.pending or len(self.pending) >= max(1, self.slots // 4):
                continue
            if self._start_read(key, urgent=False) is None:
                return
            self._prefetched[key] = 1
            self.stats.ahead += 1

    def get(self, layer: int, e: int, count: bool = True) -> list[np.ndarray]:
        """The expert's stored parts (views into its slot), waiting for its read if needed.
        count=False for the second and third part of one use, so statistics count expert uses."""
        return self._views(self.slot_of(layer, e, count), layer)

    def get_many(self, layer: int, experts) -> list[list[np.ndarray]]:
        """Several experts resident together (for a kernel that takes them all at once): they are held
        until the next `prefetch`/`get_many`; at most `slots - 1` at a time."""
        return [self._views(slot, layer) for slot in self.slots_of(layer, experts)]

    def slots_of(self, layer: int, experts) -> list[int]:
        """`get_many`'s slots, for a caller that addresses them itself: expert i's part p lies at
        `buffer[slot, offsets[layer][p]:offsets[layer][p + 1]]`."""
        keys = [(layer, int(e)) for e in experts]
        if len(keys) > self.slots - 1:
            raise WeightError(f"expert cache: {len(keys)} experts at once do not fit in {self.slots} slots")
        self.held = set(keys)
        lru, slots = self.lru, []
        for key in keys:
            slot = lru.get(key)   # None: a miss, or a read still in flight: slot_of waits for it
            slots.append(self.slot_of(*key, settle=False) if slot is None else self._hit(key, slot))
        self._settle()
        return slots

    def used(self, layer: int, experts) -> None:
        """A step's picks of `layer` that a backend ran straight from their slots, having found them all
        resident in `table`: held, and counted as `slots_of` counts its hits (`count_used`); finished
        reads settled (the ring's waiting reads then enter the kernel) as `slots_of` settles them."""
        self.count_used(layer, experts)
        if self.pending:
            self._settle()

    def slot_of(self, layer: int, e: int, count: bool = True, settle: bool = True) -> int:
        """The slot holding the expert, waiting for its read if needed (see `get`)."""
        key = (layer, e)
        if count and self.policy == "lfru":
            self._count(key)
        slot = self.lru.get(key)
        if slot is not None:
            self.lru.move_to_end(key)
            self._touch(key, slot)
            if count:
                self.stats.hits += 1
                if self._prefetched[key]:
                    self.stats.prefetch_hits += 1
                    self._prefetched[key] = 0
        else:
            t0 = time.perf_counter()
            if key in self.pending:
                slot, fut = self.pending[key]
                self.stats.late += 1
                self._prefetched[key] = 0
            else:
                fut = self._start_read(key)
                if fut is None:
                    raise WeightError("expert cache: every slot is in use (budget too small for this step)")
                slot = self.pending[key][0]
                self.stats.misses += 1
            fut.result()
            self.stats.stall_s += time.perf_counter() - t0
        if settle and self.pending:
            self._settle()
        return slot

    def use_file(self, path: str, offset: int, experts: int) -> None:
        """Read every expert from a prepared expert file (st_sdk.offload.prepared): expert e of a layer
        at offset + (layer * experts + e) * stride, already in the cache's layouts, read straight into
        its slot in aligned pieces (as many as it has parts, in parallel), through io_uring where the
        kernel allows it (st_sdk.offload.uring; ST_OFFLOAD_URING=0 keeps the I/O threads)."""
        if offset % DIRECT_ALIGN or self._stride % DIRECT_ALIGN:
            raise ValueError("a prepared expert file's experts must be aligned for direct reads")
        self._fd(path)
        self.prepared = (path, int(offset), int(experts))
        if self._ring is None and self._direct_fds.get(path) is not None:
            self._ring = Ring.open()   # None where io_uring is unavailable: the I/O threads read

    def drop_file_pages(self) -> None:
        """Drop the page cache of the files experts are read from (POSIX_FADV_DONTNEED; pages mapped by a
        process stay): once loaded, what the load read of them (the weights it copied or repacked) is
        not read again, and the kernel would otherwise count it in the budget until it reclaimed it, which
        under a hard limit it may do only after evicting pages the process still runs from."""
        if not hasattr(os, "posix_fadvise"):
            return
        for fd in self._fds.values():
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def commit(self) -> None:
        """Fault the slots' pages in on a background thread, once the plan is final (offload.pages)."""
        self._committing = commit_in_background(self.buffer)

    def resize(self, slots: int) -> None:
        """Change the number of slots before first use (the plan learnt of another resident copy)."""
        if self.lru or self.pending:
            raise RuntimeError("the expert cache can only be resized before it is used")
        self._allocate(slots)

    def set_layouts(self, layouts: list[list]) -> None:
        """Hold experts converted as they are read: layouts[layer][part] is None (as stored) or an object
        with `nbytes` and `convert(src, out)` (Backend.expert_layout); slots are resized to fit. Before
        first use only."""
        if self.lru or self.pending:
            raise RuntimeError("the expert cache's layouts can only be set before it is used")
        self.layouts = [list(lays) for lays in layouts]
        self._layout_offsets()
        self._allocate(self.slots)

    def keep_within(self, rss: Callable[[], int] | None = None) -> int:
        """The run-time check (called before each step): while the process's resident bytes, and the
        bytes callers are about to allocate (`reserved`: every position's logits, for one), pass `limit`,
        first drop the pages of the weights read by rows (`row_maps`, which refault a row at a time),
        then give slots back to the system (an unheld expert evicted, its pages released with
        MADV_DONTNEED) down to `minimum_slots`. Slots given back return, empty, while the process stays
        two slots below its limit with them. Returns the slots given back now (negative: taken back)."""
        if self.limit is None:
            return 0
        rss, reserved = rss or resident_bytes, sum(self.reserved.values())
        over = rss() + reserved - self.limit
        if over > 0 and self.row_maps:
            from ..weights.mapping import release_map

            if sum(release_map(a) for a in self.row_maps):
                over = rss() + reserved - self.limit
        n = 0
        if over > 0:
            self._committing.set()
        while over > 0 and self.slots > self.minimum_slots:
            slot = self._take_slot()   # a free slot, else an unheld expert's, evicted
            if slot is None:
                break
            if hasattr(mmap, "MADV_DONTNEED"):
                self._mm.madvise(mmap.MADV_DONTNEED, slot * self._stride, self._stride)
            self._released.append(slot)
            self.slots -= 1
            over -= self._stride
            n += 1
        if n:
            self.shrunk += n
            log.warning("st-sdk: the process passed its memory budget's limit; the expert cache gave back %d slots "
                        "(%d left)", n, self.slots)
            return n
        while self._released and over + 2 * self._stride <= 0:
            self.free.append(self._released.pop())
            self.slots += 1
            over += self._stride
            n -= 1
        if n:
            log.info("st-sdk: room under the memory budget's limit again; the expert cache took back %d slots "
                     "(%d now)", -n, self.slots)
        return n

    def close(self) -> None:
        self._committing.set()
        self._pool.shutdown(wait=True)
        if self._ring is not None:
            self._ring.close()   # waits for the reads in flight
            self._ring = None
        self._close_files()

    @property
    def reader(self) -> str:
        """Who reads the experts: "io_uring" (the prepared file, where the kernel allows it) or the I/O threads."""
        return f"{self.io_threads} I/O threads" if self.reads_on_threads else "io_uring"

    @property
    def reads_on_threads(self) -> bool:
        """Whether expert reads run on the I/O threads (they then need a core), not through io_uring (the
        prepared file's direct reads, while its filesystem takes them)."""
        return self._ring is None or self._direct_fds.get(self.prepared[0]) is None

    @property
    def nbytes(self) -> int:
        return int(self.slots * self._stride)

    # ---- internals ------------------------------------------------------------------------
    def _layout_offsets(self) -> None:
        """Where each layer's parts lie in a slot, at their size in the cache's layout."""
        self.offsets = [np.cumsum([0] + [stored if lay is None else int(lay.nbytes) for stored, lay in zip(parts, lays)])
                        for parts, lays in zip(self.part_bytes, self.layouts)]
        self.bundle_bytes = int(max(o[-1] for o in self.offsets))
        self._pieces: dict[int, list[tuple[int, int]]] = {}   # layer -> [a, b) of each piece read (_start_read)

    def _allocate(self, slots: int) -> None:
        """Slots in anonymous memory, each a whole number of pages (so one can be given back alone);
        pages are committed by `commit` in the background, or else as slots fill."""
        self.slots = slots
        self._stride = -(-self.bundle_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        # private: MADV_DONTNEED then frees a slot's pages (a shared anonymous mapping keeps them, charged)
        self._mm = anonymous(max(1, slots) * self._stride, huge=True)
        self.buffer = np.frombuffer(self._mm, np.uint8).reshape(max(1, slots), self._stride)
        self._base = int(self.buffer.ctypes.data)   # slot i at _base + i * _stride
        self.free = list(range(slots))[::-1]
        self._new_slots(slots)

    def _views(self, slot: int, layer: int) -> list[np.ndarray]:
        row, offsets = self.buffer[slot], self.offsets[layer]
        return [row[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    def _settle(self) -> None:
        """Move finished reads into the LRU (compute thread only, so the LRU needs no lock). A ring's
        read finishes only when reaped (or when its reader read it again: RingReads.result), so the
        pending reads are looked at only when that happened since the last look."""
        ring = self._ring
        if ring is not None:
            ring.reap()
            if ring.reaped == self._looked_at and not self.reads_on_threads:
                return
            self._looked_at = ring.reaped
        for key in [k for k, (_, f) in self.pending.items() if f.done()]:
            slot, fut = self.pending.pop(key)
            self._mark(key, -1)
            fut.result()   # re-raise a failed read here, on the compute thread
            self.lru[key] = slot
            self._mark(key, slot)
            self._touch(key, slot)

    def _mark(self, key: Key, where: int) -> None:
        if self.table is not None:
            self.table[key] = where

    def start_from(self, counts: np.ndarray) -> int:
        """Before first use: lfru's counts from an earlier run's `use_counts`, and the experts counted most
        read into the slots (`warm`). Returns how many were read."""
        self._widen(counts.shape[1] - 1)
        self.uses[:] = 0.0
        self.uses[:, :counts.shape[1]] = counts
        order = np.argsort(-counts, axis=None, kind="stable")[:max(0, self.slots - 1)]
        return self.warm([divmod(int(i), counts.shape[1]) for i in order if counts.flat[i] > 0])

    def warm(self, keys, batch: int = 64) -> int:
        """Before first use: read `keys` [(layer, expert)], most wanted first, into free slots (as many
        as there are, less one), waiting for them, with a progress bar on a terminal; the statistics
        start after. Returns how many."""
        from ..weights.export import progress_bar

        if self.lru or self.pending:
            raise RuntimeError("the expert cache can only be warmed before it is used")
        keys = list(dict.fromkeys(keys))[:max(0, len(self.free) - 1)]
        size = [int(self.offsets[layer][-1]) for layer, _ in keys]
        with progress_bar(sum(size), f"reading the {len(keys)} experts used most") as bar:
            for i in range(0, len(keys), batch):
                for key in keys[i:i + batch]:
                    self._start_read(key)
                for _, fut in list(self.pending.values()):
                    fut.result()
                self._settle()
                bar.update(sum(size[i:i + batch]))
        self.stats.__init__()
        self.warmed = len(self.lru)
        return self.warmed

    def _take_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        self._settle()
        for _ in range(2):
            key = self._victim()
            if key is not None:
                self.stats.evictions += 1
                slot = self.lru.pop(key)
                self._mark(key, -1)
                self._seq[slot] = -1
                return slot
            # every resident expert is held: wait for prefetches nobody holds any more, then evict them
            for key, (_, fut) in list(self.pending.items()):
                if key not in self.held:
                    fut.result()
            self._settle()
        return None

    def _start_read(self, key: Key, urgent: bool = True) -> Reads | None:
        """Take a slot for `key` and start reading it on an I/O thread (or the io_uring ring, where reads
        not `urgent`, a guess's, wait behind the others); None when no slot can be had."""
        self._widen(key[1])
        slot = self._take_slot()
        if slot is None:
            return None
        if self.prepared is not None:   # in as many aligned pieces as the expert has parts, read in parallel
            pieces = self._pieces.get(key[0])
            if pieces is None:
                length = min(self._stride, -(-int(self.offsets[key[0]][-1]) // DIRECT_ALIGN) * DIRECT_ALIGN)
                n = len(self.part_bytes[key[0]])
                cuts = sorted({min(length, -(-length * i // n // DIRECT_ALIGN) * DIRECT_ALIGN) for i in range(n + 1)})
                pieces = self._pieces[key[0]] = list(zip(cuts[:-1], cuts[1:]))
            if not self.reads_on_threads:
                fut = self._ring_read(key, slot, pieces, urgent)
            else:
                fut = Reads([self._pool.submit(self._read_prepared, key, slot, a, b) for a, b in pieces])
        else:
            fut = Reads([self._pool.submit(self._read, key, slot, part) for part in range(len(self.part_bytes[key[0]]))])
        self.pending[key] = (slot, fut)
        self._mark(key, -2)
        return fut
