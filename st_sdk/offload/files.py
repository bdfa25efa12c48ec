"""What budget mode keeps in the cache directory's experts/ for a model, and how it tells current from
stale: the prepared expert files (st_sdk.offload.prepared) and the expert use counts kept between loads
(st_sdk.offload.profile) both record the model files they were made from, each as `stamp` gives it,
and are stale once one of those changed or is gone (`sources_changed`). `Entry` is one such file, as
`prepared.scan` lists them for `st-sdk cache`."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

LEFTOVER_AGE = 600   # seconds a partial file of a process no longer running must lie untouched to be a leftover


@dataclass
class Entry:
    """One file in the prepared-expert directory: `state` is "current" (read by the loads of its model
    and layouts), "stale" (never read again: `why` says why), or "writing" (a live process's partial
    file); `sources` the model files it was made from, as its header names them; `kind` "experts" (a
    prepared expert file) or "counts" (expert use counts kept between loads: st_sdk.offload.profile)."""
    path: Path
    nbytes: int
    state: str
    why: str = ""
    sources: tuple[str, ...] = ()
    kind: str = "experts"


def stamp(path: str) -> list:
    """What identifies a model file's bytes: [real path, size, modification time in ns] (OSError if gone)."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def source_files(cache, experts: int) -> list[list]:
    """The model files an ExpertCache reads its experts from, each as `stamp` gives it, in path order."""
    sources = sorted({ext.path for layer in range(len(cache.part_bytes)) for e in range(experts)
                      for ext in cache.locate(layer, e)})
    return [stamp(p) for p in sources]


def sources_changed(recorded) -> str:
    """Why model files recorded as `stamp`s no longer hold those bytes ('' while they do, or while one
    cannot be looked at just now: a drive not mounted is not known to have changed)."""
    for src, size, mtime in recorded:
        try:
            now = stamp(src)
        except FileNotFoundError:
            return f"its model file {src} is gone"
        except OSError:
            continue
        if now[1:] != [size, mtime]:
            return f"its model file {src} changed since it was written"
    return ""


def write_state(pid: int, mtime: float) -> tuple[str, str]:
    """A half-written file's state and why, for `Entry`: "writing" while process `pid` runs or the file
    was touched within LEFTOVER_AGE seconds, else "stale" (an interrupted write's leftover)."""
    if running(pid) or time.time() - mtime < LEFTOVER_AGE:
        return "writing", f"being written by process {pid}"
    return "stale", f"left by an interrupted write (process {pid} is gone)"


def running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (assumed so where that cannot be asked)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
