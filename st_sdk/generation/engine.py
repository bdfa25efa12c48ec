"""`Engine`: continuous batching. One engine thread per model owns the running requests and their
sessions and runs one `Model.feed_batch` step after another.

Requests join and leave the running batch at step boundaries. Every step feeds each decoding request
its last sampled token, and prompt chunks of requests still prefilling up to `chunk` tokens in all,
so running streams keep flowing while a new prompt comes in. A request's prompt is always cut at the
same places (multiples of `chunk` from what its session lacks), whatever else runs: with the batched
step equal to the per-sequence step row by row, a request's tokens do not depend on its neighbours.

Bounds: at most `max_batch` requests run at once and their KV caches (reserved for prompt plus
max_new_tokens, or the model's whole context) stay within `max_kv_bytes`; the rest wait in FIFO order, at most
`max_queue` of them (beyond that `submit` raises BusyError). The thread starts on the first request
and ends after `idle_s` without work, so an unused model holds no thread.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from ..errors import BusyError, InputError
from .options import context_of
from .request import Request

log = logging.getLogger("st_sdk")


class EngineStats:
    """Counters for /metrics and tests (read without a lock: each is one int)."""

    def __init__(self) -> None:
        self.requests = 0                       # submitted and accepted
        self.rejected = 0                       # refused by a full queue
        self.finished: collections.Counter = collections.Counter()   # by finish reason
        self.prompt_tokens = 0                  # prompt tokens prefilled (cached ones excluded)
        self.generated_tokens = 0
        self.steps = 0
        self.step_rows = 0                      # sequences fed, summed over steps (mean batch = rows / steps)
        self.step_tokens = 0
        self.busy_s = 0.0                       # time spent in steps
        self.last_batch = 0


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int | None = None, max_kv_bytes: int | None = None,
                 chunk: int | None = None, idle_s: float = 0.5):
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_kv_bytes = max_kv_bytes
        self.chunk = chunk or model.chunk_size
        self.idle_s = idle_s
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._reserved = 0
        self._thread: threading.Thread | None = None

    def configure(self, **settings) -> "Engine":
        """Change bounds (max_batch, max_queue, max_kv_bytes, chunk, idle_s); checked."""
        for name, value in settings.items():
            if name not in ("max_batch", "max_queue", "max_kv_bytes", "chunk", "idle_s"):
                raise InputError(f"engine setting {name!r}: unknown")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < (0 if name in ("max_queue", "idle_s") else 1)):
                raise InputError(f"engine setting {name}={value!r}: expected a positive number or None")
        with self._cv:
            for name, value in settings.items():
                if name == "chunk":
                    value = min(int(value or self.model.chunk_size), self.model.chunk_size)
                setattr(self, name, value)
        return self

    # ---- what callers see ---------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def kv_reservation(self, req: Request) -> int:
        """The KV cache a request may grow to: prompt plus max_new_tokens, else the model's context."""
        ctx, n = context_of(self.model), req.opts.max_new_tokens
        return self.model.config.kv_cache_bytes(ctx if n is None else min(ctx, len(req.prompt_ids) + n))

    def submit(self, req: Request) -> Request:
        """Queue a request; the engine thread runs it. BusyError when the queue is full, InputError when
        it can never fit (its KV cache exceeds max_kv_bytes)."""
        req.kv_bytes = self.kv_reservation(req)
        if self.max_kv_bytes is not None and req.kv_bytes > self.max_kv_bytes:
            raise InputError(f"max_new_tokens: this request needs {req.kv_bytes} bytes of KV cache, more than "
                             f"the engine's bound of {self.max_kv_bytes} bytes; ask for fewer tokens")
        with self._cv:
            has_room = len(self._running) + len(self._waiting) < self.max_batch   # it would run at once
            if self.max_queue is not None and len(self._waiting) >= self.max_queue and not has_room:
                self.stats.rejected += 1
                raise BusyError(f"the queue is full ({len(self._waiting)} requests waiting, "
                                f"{len(self._running)} running); retry later")
            self.stats.requests += 1
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="st-sdk-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return req

    def release(self, req: Request) -> None:
        """Wait until the engine has let go of `req` (after cancel.set()); returns at once on the engine
        thread itself, which lets go at its next step boundary."""
        if threading.current_thread() is not self._thread:
            req.finished.wait()

    # ---- the engine thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while self._cycle():
                pass
        except BaseException as e:   # never leave a consumer waiting on a dead thread
            log.exception("st-sdk engine failed")
            with self._cv:
                for r in [*self._running, *self._waiting]:
                    r.finish("error", e)
                self._running.clear()
                self._waiting.clear()
                self._reserved = 0
                self._thread = None

    def _cycle(self) -> bool:
        with self._cv:
            self._admit()
            if not self._running:
                self._cv.wait(self.idle_s)
                self._admit()
                if not self._running:
                    self._thread = None
                    return False
            batch = list(self._running)
        for r in batch:
            if r.cancel.is_set():
                r.finish("cancelled")
        self._step([r for r in batch if r.result is None])
        with self._cv:
            for r in batch:
                if r.result is not None:
                    self._running.remove(r)
                    self._reserved -= r.kv_bytes
                    self.stats.finished[r.result.finish_reason] += 1
        return True

    def _admit(self) -> None:
        while self._waiting:
            r = self._waiting[0]
            if r.cancel.is_set():
                self._waiting.popleft()
                r.finish("cancelled")
                self.stats.finished["cancelled"] += 1
                continue
            fits = self.max_kv_bytes is None or self._reserved + r.kv_bytes <= self.max_kv_bytes
            if len(self._running) >= self.max_batch or (self._running and not fits):
                return
            self._waiting.popleft()
            r.t_admit = time.perf_counter()
            self._running.append(r)
            self._reserved += r.kv_bytes

    def _step(self, live: list[Request]) -> None:
        rows = [(r, r.next_ids()) for r in live if not r.prefilling]
        budget = self.chunk
        for r in live:
            if r.prefilling:
                ids = r.next_ids()
                if len(ids) > budget and len(rows) > sum(not q.prefilling for q in live):
                    break   # the step already carries a prompt chunk; this one waits its turn
                rows.append((r, ids))
                budget -= len(ids)
                if budget <= 0:
                    break
        if not rows:
            return
        t0 = time.perf_counter()
        try:
            logits = self.model.feed_batch([r.session for r, _ in rows], [ids for _, ids in rows])
        except BaseException as e:
            for r, _ in rows:
                r.finish("error", e)
            if not isinstance(e, Exception):
                raise
            return
        st = self.stats
        st.busy_s += time.perf_counter() - t0
        st.steps += 1
        st.step_rows += len(rows)
        st.last_batch = len(rows)
        for (r, ids), row in zip(rows, logits):
            st.step_tokens += len(ids)
            if r.prefilling:
                st.prompt_tokens += len(ids)
            before = len(r.generated)
            try:
                r.advance(len(ids), row)
            except Exception as e:
                r.finish("error", e)
            st.generated_tokens += len(r.generated) - before
