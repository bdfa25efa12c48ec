"""The user's st-sdk cache directory and the installed library versions: what the selection cache and
the benchmarks keep their files in and key their results on. Reads package metadata and the
environment only; imports nothing heavy."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable


def cache_dir() -> Path:
    """`ST_SDK_CACHE_DIR`, else the platform's user cache directory for st-sdk."""
    env = os.environ.get("ST_SDK_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("st-sdk"))


@contextmanager
def replaced_when_written(tmp: str | Path, path: str | Path):
    """Around the code that writes `tmp`: then rename it over `path` (readers see the old file or the new
    one, never half of one); on any failure, or an interruption, remove `tmp` and re-raise."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def library_versions(dists: Iterable[str]) -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed}, from package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
