"""`GenerationStream`: a running generation handed out as an iterator of text pieces."""
from __future__ import annotations

import threading
from typing import Iterator

from .result import GenerationResult


class GenerationStream:
    """Iterator of text pieces. `.result` is the GenerationResult once iteration ended (exhausted,
    closed or cancelled). `cancel()` may be called from any thread, also during the prompt's prefill;
    `close()` (or leaving a `with` block, or breaking out of a for loop and dropping the stream) ends
    it at once."""

    def __init__(self, gen: Iterator[str], out: dict, cancel: threading.Event, prompt_ids: list[int],
                 on_done=None):
        self._gen = gen
        self._prompt_ids = prompt_ids
        self._out = out
        self._cancel = cancel
        self._on_done = on_done
        self._done = False

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._gen)
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._on_done is not None and "result" in self._out:
                self._on_done(self._out["result"])

    def cancel(self) -> None:
        """Ask the generation to stop at the next chunk or token boundary (thread-safe)."""
        self._cancel.set()

    def close(self) -> None:
        if not self._done:
            self._cancel.set()
            try:
                self._gen.close()
            except ValueError:   # closed from another thread while running: the event stops it
                return
            # closed before the first piece was asked for: the generator never ran
            self._out.setdefault("result", GenerationResult("", [], self._prompt_ids, "cancelled"))
            self._finish()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def result(self) -> GenerationResult | None:
        """The final result once the stream has ended; None while it is still running."""
        return self._out.get("result") if self._done else None

