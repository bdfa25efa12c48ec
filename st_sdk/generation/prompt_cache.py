"""Prompt caching: a request reuses the KV of the longest token prefix it shares with a recent one.

As llama.cpp's server does, a model keeps the sessions (KV cache and tokens) of its last `slots`
requests (1 by default). A new `generate`/`chat` takes the idle session whose tokens share the longest
prefix with its prompt, rewinds it to that prefix (at least one prompt token is always read again, for
its logits) and prefills only the rest; `result.timings["cached_tokens"]` says how many were reused.
Results are those of a fresh session (the KV of a token does not depend on what follows it). A session
in use is never shared: concurrent requests each take their own. A request that continues an idle
session's whole token list (the next turn of a chat) takes that session; one that shares only a
prefix (a system prompt, a template's opening) gets a copy of the prefix's KV in a new session, so
the idle one stays for the next request: a burst of concurrent requests with one system prompt reads
it once. Sliding-window rings that already dropped keys of the prefix cannot give it; then the
request takes the session rewound, or starts a fresh one.

`model.prompt_cache.clear()` frees the held KV; `model.prompt_cache.slots = 0` turns caching off.
"""
from __future__ import annotations

import threading

from .. import kv


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    def __init__(self, model, slots: int = 1):
        self.model = model
        self.slots = slots
        self._idle: list = []          # most recent first
        self._lock = threading.Lock()

    def acquire(self, ids: list[int], capacity: int | None = None):
        """A session ready for `ids`: a rewound idle one sharing a prefix, else a fresh one."""
        with self._lock:
            best, n = None, 0
            for s in self._idle:
                k = common_prefix(s.tokens, ids)
                if k > n:
                    best, n = s, k
            n = min(n, len(ids) - 1)           # the last prompt token is read again, for its logits
            if best is not None and n < len(best.tokens):
                fork = self.fork(best, n, capacity)
                if fork is not None:
                    return fork
            if best is not None:
                self._idle.remove(best)
        if best is not None and best.rewind(n):
            return best
        return self.model.session(capacity=capacity)

    def fork(self, src, n: int, capacity: int | None = None):
        """A new session holding a copy of the KV of `src`'s first n tokens (what a fresh session that
        read them holds: every position on global layers, the last `window` on sliding-window ones);
        None when `src` no longer holds them or its backend's cache cannot copy."""
        if n <= 0 or not (hasattr(src.cache, "state") and hasattr(src.cache, "restore")):
            return None
        state = []
        for spec, (k, v, pos) in zip(kv.layer_specs(self.model.config), src.cache.state()):
            lo = max(0, n - spec.window) if spec.window else 0
            keep = (pos >= lo) & (pos < n)
            if int(keep.sum()) != n - lo:       # a wrapped ring dropped some of them
                return None
            state.append((k[keep], v[keep], pos[keep]))
        session = self.model.session(capacity=capacity)
        session.cache.restore(state, n)
        session.tokens = list(src.tokens[:n])
        return session

    def release(self, session) -> None:
        """Keep a finished request's session for the next request (the oldest beyond `slots` goes)."""
        if self.slots <= 0 or not session.tokens:
            return
        with self._lock:
            self._idle.insert(0, session)
            del self._idle[self.slots:]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()

    @property
    def tokens(self) -> list[list[int]]:
        """The token ids each held session covers (most recent first)."""
        with self._lock:
            return [list(s.tokens) for s in self._idle]
