"""The user's st-sdk cache directory and the installed library versions: what the selection cache and
the benchmarks keep their files in and key their results on. Reads package metadata and the
environment only; imports nothing heavy."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def cache_dir() -> Path:
    """`ST_SDK_CACHE_DIR`, else the platform's user cache directory for st-sdk."""
    env = os.environ.get("ST_SDK_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("st-sdk"))


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
