"""The context of a loaded model: the most tokens (prompt and generated) one sequence may hold.

`st_sdk.load(path, context=N)` sets it; the KV cache of a sequence never grows past it and a request
that would (prompt plus max_new_tokens) is refused. The default is the model's max_position_embeddings,
capped so that one sequence's KV cache (float32, sliding-window layers at most their window) fits in
half the memory available at load, with a logged message; under `max_memory` it is what the memory
plan provides for (min(max_position_embeddings, 4096)).
"""
from __future__ import annotations

import logging
import re

from .errors import InputError

log = logging.getLogger("st_sdk")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def resolve_context(config, context: int | None, budget: bool = False) -> int:
    """The context a model is loaded with (see the module docstring)."""
    top = config.max_position_embeddings
    if context is not None:
        if isinstance(context, bool) or not isinstance(context, int) or context < 2:
            raise InputError(f"context: expected an integer number of tokens >= 2, got {context!r}")
        if context > top:
            raise InputError(f"context={context} exceeds the model's max_position_embeddings={top}")
        return context
    if budget:
        return config.default_context
    avail = available_memory()
    if avail is None or config.kv_cache_bytes(top) <= avail // 2:
        return top
    lo, hi = 2, top          # the largest context whose KV cache fits in half the available memory
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if config.kv_cache_bytes(mid) <= avail // 2 else (lo, mid - 1)
    from .sizes import fmt_bytes

    log.warning("context capped to %d tokens: a KV cache for the model's max_position_embeddings=%d would "
                "take %s of the %s of memory available; pass load(..., context=N) to choose", lo, top,
                fmt_bytes(config.kv_cache_bytes(top)), fmt_bytes(avail))
    return lo
