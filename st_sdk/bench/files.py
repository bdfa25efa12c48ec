"""Synthetic model files for benchmarks: written once into the cache directory and reused."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from .. import synth
from ..environment import cache_dir
from ..errors import InputError

log = logging.getLogger("st_sdk")


def models_dir() -> Path:
    return cache_dir() / "models"


def synth_gguf(preset: str, fmt: str, seed: int = 0) -> Path:
    """A synthetic GGUF of `preset` in `fmt`, written once into the cache directory and reused
    (written under a temporary name, then renamed, so concurrent runs never see half a file)."""
    target = models_dir() / f"{preset}-{fmt}-seed{seed}.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):   # a second writer waits, then reuses
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".writing-") as tmp:
            log.warning("synthesising %s %s into %s (once)", preset, fmt, target)
            out = synth.write_model(tmp, preset=preset, formats=("gguf",), dtype=fmt, seed=seed)
            os.replace(_find_gguf(out, tmp), target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:   # Windows: no lock; the rename still keeps half-written files invisible
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_gguf(out, folder) -> Path:
    if isinstance(out, dict) and out.get("gguf"):   # write_model returns {"gguf": path, ...}
        return Path(out["gguf"])
    found = sorted(Path(folder).rglob("*.gguf"))
    if not found:
        raise InputError(f"synth.write_model wrote no .gguf file into {folder}")
    return found[0]
