"""Model files changing under a loaded model.

Weights are memory-mapped, so a file truncated in place (or copied over with `cp`, which truncates and
rewrites the same inode) would make the next read of a mapped page past the new end kill the process
with SIGBUS, or feed the model other bytes than it validated. Each reader keeps a `WatchedFile`: an open
descriptor of the inode it mapped and that inode's size and modification time when it was mapped.
`Model` checks them once per step (an `fstat` per file, about a microsecond) and raises `WeightError`
naming the file before any kernel runs, so the process survives and every later call fails the same way.

A file replaced by a rename (`mv new.gguf model.gguf`, how downloaders and `st-sdk quantize` write) or
deleted leaves the mapped inode intact: the model keeps running on the weights it loaded. A step
already running when the file is truncated can still touch a page past the new end and die with
SIGBUS, as any reader of a memory-mapped file does; replace model files by renaming, never in place.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import WeightError


class WatchedFile:
    """One mapped file: its inode held open, its size and mtime when mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise WeightError(f"{self.path}: cannot open ({e.strerror})") from None
        st = os.fstat(self.fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns

    def changed(self) -> str | None:
        """What changed since the file was mapped, or None."""
        st = os.fstat(self.fd)
        if st.st_size != self.size:
            return f"its size changed from {self.size} to {st.st_size} bytes"
        if st.st_mtime_ns != self.mtime_ns:
            return "it was modified in place"
        return None

    def check(self) -> None:
        why = self.changed()
        if why is not None:
            raise WeightError(f"{self.path}: the model file changed on disk after it was loaded ({why}); "
                              "load it again (replace model files by renaming a new file over them, never in place)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class FileWatch:
    """Every file a model's weights are mapped from; `check()` raises WeightError if one changed."""

    def __init__(self, files: list[WatchedFile]):
        self.files = list(files)

    def check(self) -> None:
        for f in self.files:
            f.check()
