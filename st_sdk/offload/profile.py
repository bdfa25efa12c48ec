"""Expert use counts kept between loads of a model in memory-budget mode.

A cache that starts empty spends its first few hundred tokens learning which experts a model's
routing favours: lfru ranks experts by their use counts, and a few dozen uses each rank the experts
near the cache's cut poorly (docs/memory_budget.md, "Cache policy"). So the counts outlive the
process: each load with a memory budget writes them, at exit and whenever lfru ages them, to
`experts/<model file>.<hash>.uses.npy` in st-sdk's cache directory (the hash of the file's path, size
and modification time), and the next load of the same file starts from them: lfru's counts are set
to them, and the experts counted most are read into the cache's slots at load, before the first token.

`ST_OFFLOAD_PROFILE`: "1" (the default) reads and writes the counts; "read" reads them and leaves the
file as it is (to measure runs against one recorded profile); "0" neither.
A file that cannot be read, or that does not fit the model, is ignored with a warning naming it.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import weakref
from pathlib import Path

import numpy as np

log = logging.getLogger("st_sdk.offload")

ENV = "ST_OFFLOAD_PROFILE"
MODES = ("1", "read", "0")


def mode() -> str:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in MODES:
        from ..errors import InputError

        raise InputError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    return value


def profile_path(model_path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Where the counts of the model file at `model_path` are kept."""
    from ..environment import cache_dir

    p = Path(model_path).resolve()
    st = p.stat()
    digest = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return Path(directory or cache_dir() / "experts") / f"{p.name}.{digest}.uses.npy"


def read(path: Path, layers: int, experts: int) -> np.ndarray | None:
    """The counts [layers, experts] in `path`; None (with a warning) when missing, unreadable or not
    this model's."""
    if not path.exists():
        return None
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("st-sdk: ignoring the expert use counts in %s: %s", path, exc)
        return None
    if counts.shape != (layers, experts) or counts.dtype.kind != "f" or not np.all(np.isfinite(counts)) \
            or np.any(counts < 0):
        log.warning("st-sdk: ignoring the expert use counts in %s: %s %s, expected float32 [%d, %d] of finite "
                    "counts >= 0", path, counts.dtype, list(counts.shape), layers, experts)
        return None
    return counts


def write(path: Path, counts: np.ndarray) -> None:
    """Write the counts whole (a temporary file renamed over the old one); a failure is logged."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, counts.astype(np.float32), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("st-sdk: could not keep the expert use counts in %s: %s", path, exc)
        try:
            tmp.unlink()
        except OSError:
            pass


def attach(cache, experts: int, model_path) -> int:
    """Start `cache` (before first use) from the counts kept for `model_path` and have its counts kept
    as ST_OFFLOAD_PROFILE says; returns the experts read into the slots now (0 without counts)."""
    how = mode()
    if how == "0" or model_path is None or cache.policy != "lfru" or not Path(model_path).is_file():
        return 0
    path = profile_path(model_path)
    layers = len(cache.part_bytes)
    counts = read(path, layers, experts)
    warmed = cache.start_from(counts) if counts is not None else 0
    if how == "1":
        ref = weakref.ref(cache)

        def keep() -> None:
            c = ref()
            if c is not None and c.uses:   # a load that never ran a token keeps what was there
                write(path, c.use_counts(experts))

        cache.keep_counts = keep
        atexit.register(keep)
    return warmed
