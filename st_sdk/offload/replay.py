"""Replaying recorded expert picks through an expert cache: the reads a cache of a given size and policy
would make, with no model file read (benchmarks/cache_policy.py, st-sdk's cache policy figures)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .cache import ExpertCache, Extent
from .stats import OffloadStats


def replay(picks, slots: int, policy: str = "lfru", prefetch: bool = True) -> OffloadStats:
    """The statistics a cache of `slots` experts gets on recorded picks (int [tokens, layers, k], as
    `st_sdk.routing.RoutingRecorder.picks()` returns them), decoding token by token as budget mode does:
    per layer the router's prefetch (taken as finished before the MoE runs), then the MoE's reads (the
    picked experts together, in pick order, as the C backend's budget-mode MoE reads them). No
    model file is read; `reads` counts the experts that would be read from it."""
    import tempfile

    picks = _as_picks(picks)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "expert")
        with open(path, "wb") as f:
            f.write(b"\0")
        cache = ExpertCache(lambda layer, e: [Extent(path, 0, 1)] * 3, [[1, 1, 1]] * picks.shape[1], slots,
                            io_threads=1, drop_page_cache=False, files=(path,), policy=policy,
                            direct=False)
        try:
            for token in picks:
                for layer, ids in enumerate(token):
                    if prefetch:
                        cache.prefetch(layer, ids)
                        for _, fut in list(cache.pending.values()):
                            fut.result()
                        cache._settle()
                    cache.get_many(layer, list(dict.fromkeys(ids.tolist())))   # as the C backend's MoE
            return cache.stats
        finally:
            cache.close()


def _requests(picks: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    """The experts budget mode asks for, in its order: per token and layer, the distinct picks in pick
    order; [(token, [(layer, expert), ...]) per layer step]."""
    return [(t, [(layer, e) for e in dict.fromkeys(ids.tolist())])
            for t, token in enumerate(picks) for layer, ids in enumerate(token)]


def _as_picks(picks) -> np.ndarray:
    picks = np.asarray(picks, dtype=np.int64)
    if picks.ndim != 3:
        raise InputError(f"picks: expected [tokens, layers, k], got shape {picks.shape}")
    return picks


def _checked(picks, slots: int) -> np.ndarray:
    picks = _as_picks(picks)
    if slots < picks.shape[2]:
        raise InputError(f"slots: {slots} cannot hold one layer's {picks.shape[2]} picks")
    return picks


def optimal_reads(picks, slots: int) -> np.ndarray:
    """Reads per token of Belady's offline optimum on the same picks and slots: on a miss the resident
    expert asked for again furthest in the future goes, never one of the step's own picks (held
    together, as the MoE holds them). No policy that does not know the future reads fewer; int [tokens]."""
    import heapq

    picks = _checked(picks, slots)
    steps = _requests(picks)
    flat = [key for _, keys in steps for key in keys]
    never = len(flat)
    next_use, last = [never] * len(flat), {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = last.get(flat[i], never)
        last[flat[i]] = i
    reads = np.zeros(len(picks), np.int64)
    resident: dict[tuple[int, int], int] = {}   # key -> the index of its next use
    heap: list[tuple[int, tuple[int, int]]] = []   # (-next use, key), stale entries skipped
    i = 0
    for t, keys in steps:
        held = set(keys)
        for key in keys:
            if key not in resident:
                reads[t] += 1
                if len(resident) >= slots:
                    kept = []
                    while True:
                        neg, victim = heapq.heappop(heap)
                        if resident.get(victim) != -neg:
                            continue   # stale
                        if victim in held:
                            kept.append((neg, victim))
                            continue
                        break
                    for item in kept:
                        heapq.heappush(heap, item)
                    del resident[victim]
            resident[key] = next_use[i]
            heapq.heappush(heap, (-next_use[i], key))
            i += 1
    return reads


def static_reads(picks, slots: int) -> np.ndarray:
    """Reads per token of the best fixed set chosen in hindsight: the `slots - k` experts used most over
    all the picks stay resident once read, the rest pass through k slots, least recently used first. A
    frequency-counting policy approaches it on a long run whose routing does not drift; int [tokens]."""
    from collections import Counter, OrderedDict

    picks = _checked(picks, slots)
    steps = _requests(picks)
    k = picks.shape[2]
    counts = Counter(key for _, keys in steps for key in keys)
    pinned = {key for key, _ in counts.most_common(slots - k)}
    seen: set = set()
    passing: OrderedDict = OrderedDict()
    reads = np.zeros(len(picks), np.int64)
    for t, keys in steps:
        for key in keys:
            if key in pinned:
                reads[t] += key not in seen
                seen.add(key)
            elif key in passing:
                passing.move_to_end(key)
            else:
                reads[t] += 1
                passing[key] = None
                if len(passing) > k:
                    passing.popitem(last=False)
    return reads
