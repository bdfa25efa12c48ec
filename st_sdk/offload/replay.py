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

    picks = np.asarray(picks, dtype=np.int64)
    if picks.ndim != 3:
        raise InputError(f"picks: expected [tokens, layers, k], got shape {picks.shape}")
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
