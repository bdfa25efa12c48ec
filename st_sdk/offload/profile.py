"""Expert use counts kept between loads of a model in memory-budget mode.

A cache that starts empty spends its first few hundred tokens learning which experts a model's
routing favours: lfru ranks experts by their use counts, and a few dozen uses each rank the experts
near the cache's cut poorly (docs/memory_budget.md, "Cache policy"). So the counts outlive the
process: each load with a memory budget writes them, at exit and whenever lfru ages them, to
`experts/<model>.<hash>.uses.npz` in st-sdk's cache directory (`<model>`: the model file's or
directory's name; the hash: of the paths, sizes and modification times of the files its experts are
read from, a GGUF file or a Hugging Face directory's safetensors files, which the file records too),
and the next load of the same files starts from them: lfru's counts are set to them, and the experts
counted most are read into the cache's slots at load, before the first token.

With them each layer's share of live expert neurons over the run is kept, where the backend counts
it (the C backend: `live_counter`), and the next load lays each layer's experts out by it
(Backend.expert_layouts: the C backend's sparse ReGLU layouts in the layers with few live neurons, as
a loaded model's are chosen from a prefill at load, which a budget does not run).

`st-sdk cache` lists the kept counts with the prepared expert files (`examine`): stale once a model
file they were counted on changed or is gone, and `--clean` removes them. A load removes the stale
counts of its own model files (an earlier version's).

`ST_OFFLOAD_PROFILE`: "1" (the default) reads and writes the counts; "read" reads them and leaves the
file as it is (to measure runs against one recorded profile); "0" neither.
A file that cannot be read, or that does not fit the model, is ignored with a warning naming it.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import weakref
import zipfile
from pathlib import Path

import numpy as np

from .files import Entry, source_files, sources_changed, write_state

log = logging.getLogger("st_sdk.offload")

ENV = "ST_OFFLOAD_PROFILE"
MODES = ("1", "read", "0")


def mode() -> str:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in MODES:
        from ..errors import InputError

        raise InputError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    return value


SUFFIX = ".uses.npz"
LEGACY_SUFFIX = ".uses.npy"   # an earlier st-sdk's: the counts alone, no model files recorded
_TMP = re.compile(r"^.+\.uses\.npz\.(?P<pid>\d+)\.tmp$")


def is_counts_file(name: str) -> bool:
    """Whether a file name in the cache directory's experts/ is kept counts (or a write's leftover)."""
    return name.endswith((SUFFIX, LEGACY_SUFFIX)) or _TMP.match(name) is not None


def profile_path(sources: list, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Where the counts of a model named `name` whose experts are read from `sources` (model files as
    `files.source_files` gives them) are kept."""
    from ..environment import cache_dir

    digest = hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:20]
    return Path(directory or cache_dir() / "experts") / f"{name}.{digest}{SUFFIX}"


def _load(path: Path) -> tuple[np.ndarray, list]:
    """The counts in `path` and the model files they were counted on (OSError, ValueError, KeyError
    or zipfile.BadZipFile when the file is not kept counts)."""
    arrays = _arrays(path)
    return arrays["counts"], _sources_in(arrays)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a kept-counts file, read at once (FileNotFoundError, or another of BAD_FILE when
    it is not an archive of arrays)."""
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _sources_in(arrays: dict) -> list:
    """The model files the counts among a file's arrays were counted on (KeyError or ValueError when the
    arrays are not kept counts)."""
    if "counts" not in arrays:
        raise KeyError("no counts")
    sources = json.loads(str(arrays["sources"]))
    if not isinstance(sources, list) or not all(isinstance(s, list) and len(s) == 3 for s in sources):
        raise ValueError("no list of model files")
    return sources


BAD_FILE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def _counts_in(arrays: dict, path: Path, layers: int, experts: int) -> np.ndarray | None:
    """The counts [layers, experts] among a file's arrays; None (with a warning) when they are not this
    model's."""
    counts = arrays["counts"]
    if counts.shape != (layers, experts) or counts.dtype.kind != "f" or not np.all(np.isfinite(counts)) \
            or np.any(counts < 0):
        log.warning("st-sdk: ignoring the expert use counts in %s: %s %s, expected float32 [%d, %d] of finite "
                    "counts >= 0", path, counts.dtype, list(counts.shape), layers, experts)
        return None
    return counts


def _live_in(arrays: dict, path: Path, layers: int) -> list[float | None] | None:
    """The live shares [layers] among a file's arrays (None for a layer no step ran); None when there are
    none (an earlier st-sdk's file) or they are not this model's (with a warning)."""
    live = arrays.get("live")
    if live is None:
        return None
    if live.shape != (layers,) or live.dtype.kind != "f" or np.any((live < 0) | (live > 1)):
        log.warning("st-sdk: ignoring the live shares kept in %s: %s %s, expected float32 [%d] of shares in "
                    "[0, 1]", path, live.dtype, list(live.shape), layers)
        return None
    return [None if np.isnan(v) else float(v) for v in live.tolist()]


def _layouts_in(arrays: dict, layers: int) -> tuple[str, list[str]] | None:
    """The layouts a backend chose (`write`'s layouts) among a file's arrays, as (its name, one per
    layer); None when there are none or they are not this model's."""
    try:
        kept = json.loads(str(arrays["layouts"])) if "layouts" in arrays else None
    except ValueError:
        return None
    if not (isinstance(kept, list) and len(kept) == 2 and isinstance(kept[0], str) and isinstance(kept[1], list)
            and len(kept[1]) == layers and all(isinstance(v, str) for v in kept[1])):
        return None
    return kept[0], kept[1]


def read_live(path: Path, layers: int) -> list[float | None] | None:
    """The live shares [layers] kept in `path` with the counts (None for a layer no step ran); None when
    there are none (the file is missing, or an earlier st-sdk's) or they are not this model's (with a
    warning)."""
    try:
        return _live_in(_arrays(path), path, layers)
    except BAD_FILE:
        return None   # find_kept names the file's fault


def write(path: Path, counts: np.ndarray, sources: list, live: list | None = None,
          layouts: tuple[str, list[str]] | None = None) -> None:
    """Write the counts whole, with the model files they were counted on, and when given the layers'
    live shares and the layouts a backend chose from them, (its name, one per layer); a temporary file
    renamed over the old one; a failure is logged."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    extra = {} if live is None else {"live": np.array([np.nan if v is None else v for v in live], np.float32)}
    if layouts is not None:
        extra["layouts"] = np.array(json.dumps([layouts[0], list(layouts[1])]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, counts=counts.astype(np.float32), sources=np.array(json.dumps(sources)), **extra)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("st-sdk: could not keep the expert use counts in %s: %s", path, exc)
        try:
            tmp.unlink()
        except OSError:
            pass


def examine(path: Path) -> Entry:
    """What a kept-counts file in the cache directory is (an entry of `prepared.scan`): stale when a
    model file it was counted on changed or is gone, when an earlier st-sdk wrote it without naming
    them, when it is damaged, or when it is a write's leftover whose process is gone."""
    try:
        st = os.stat(path)
    except OSError as e:
        return Entry(path, 0, "stale", f"cannot be read ({e.strerror})", kind="counts")
    entry = functools.partial(Entry, path, st.st_size, kind="counts")
    tmp = _TMP.match(path.name)
    if tmp:
        return entry(*write_state(int(tmp["pid"]), st.st_mtime))
    if path.name.endswith(LEGACY_SUFFIX):
        return entry("stale", "kept by an earlier st-sdk, without the names of the model files counted on")
    try:
        _, sources = _load(path)
    except BAD_FILE:
        return entry("stale", "damaged (not kept expert use counts)")
    why = sources_changed(sources)
    return entry("stale" if why else "current", why, tuple(str(s[0]) for s in sources))


def _remove_stale(directory: Path, sources: list, own: Path) -> None:
    """The stale counts kept for these model files (an earlier version's): gone, each logged. `own`, the
    file kept for them now (named by their sizes and times), is not looked at."""
    names = {str(s[0]) for s in sources}
    try:
        found = [p for p in directory.iterdir() if is_counts_file(p.name) and p.name != own.name]
    except OSError:
        return
    for e in map(examine, found):
        if e.state == "stale" and names.intersection(e.sources):
            try:
                os.unlink(e.path)
                log.info("st-sdk: removed the stale expert use counts %s (%s)", e.path.name, e.why)
            except OSError:
                pass


def _kept_for(cache, experts: int, model_path) -> tuple[Path, list] | None:
    """Where the counts of the model files `cache` reads its experts from are kept, and those files
    (`model_path`, the model's file or directory, names them); None where ST_OFFLOAD_PROFILE is "0",
    the policy keeps no counts, or a model file is gone since it was opened (nothing to key them on)."""
    if mode() == "0" or cache.policy != "lfru":
        return None
    try:
        sources = source_files(cache, experts)
    except OSError:
        return None
    if not sources:
        return None
    return profile_path(sources, Path(model_path or sources[0][0]).name), sources


def keep_shares(kept: list, seen: list) -> list:
    """The live shares to keep after a run: each layer's the mean of the share kept before and this
    run's, so that one run's text moves a layer's layout less (a layout changed makes a new prepared
    expert file); a layer one of them lacks keeps the other's."""
    return [old if new is None else new if old is None else (old + new) / 2 for new, old in zip(seen, kept)]


@dataclasses.dataclass
class Kept:
    """What earlier loads kept for a model's files, read once at load (`find_kept`): where (`path`), the
    files counted on (`sources`), lfru's counts [layers, experts], each layer's live share, and the
    layouts a backend chose from the shares kept before them, as (its name, one per layer); each None
    where the file lacks it or it is not this model's (the file's faults logged, naming it)."""
    path: Path
    sources: list
    counts: np.ndarray | None = None
    live: list | None = None
    layouts: tuple[str, list[str]] | None = None

    def layouts_for(self, backend: str) -> list[str] | None:
        """The kept layouts if `backend` (its name) chose them, else None."""
        return self.layouts[1] if self.layouts is not None and self.layouts[0] == backend else None


def find_kept(cache, experts: int, model_path) -> Kept | None:
    """Before the cache's layouts are set: what is kept for the model files `cache` reads its experts
    from (`model_path`, the model's file or directory, names it), its file read once; None where
    ST_OFFLOAD_PROFILE is "0", the policy keeps no counts, or a model file is gone since it was opened."""
    found = _kept_for(cache, experts, model_path)
    if found is None:
        return None
    kept, layers = Kept(*found), len(cache.part_bytes)
    if not kept.path.exists():
        return kept
    try:
        arrays = _arrays(kept.path)
        _sources_in(arrays)   # counts and the files they were counted on, else the file is not kept counts
    except BAD_FILE as exc:
        log.warning("st-sdk: ignoring the expert use counts in %s: %s", kept.path, exc or type(exc).__name__)
        return kept
    kept.counts = _counts_in(arrays, kept.path, layers, experts)
    kept.live = _live_in(arrays, kept.path, layers)
    kept.layouts = _layouts_in(arrays, layers)
    return kept


def read_layouts(path: Path, layers: int, backend: str) -> list[str] | None:
    """The layouts [layers] `backend` chose (`write`'s layouts) kept in `path`; None when there are
    none, another backend's, or not this model's."""
    try:
        kept = _layouts_in(_arrays(path), layers)
    except BAD_FILE:
        return None
    return kept[1] if kept is not None and kept[0] == backend else None


def attach(cache, experts: int, kept: Kept | None) -> int:
    """Start `cache` (before first use) from the counts `find_kept` found for the model files it reads
    its experts from, and have its counts kept as ST_OFFLOAD_PROFILE says (in `cache.counts_file`);
    returns the experts read into the slots now (0 without counts)."""
    if kept is None:
        return 0
    path, sources, counts = kept.path, kept.sources, kept.counts
    cache.counts_file = path
    warmed = cache.start_from(counts) if counts is not None else 0
    if mode() == "1":
        ref = weakref.ref(cache)
        before = kept.live if counts is not None else None

        def keep() -> None:
            c = ref()
            if c is not None and c.uses.any():   # a load that never ran a token keeps what was there
                seen = c.live_seen() if c.live_seen is not None else None
                if seen is not None and before is not None:   # averaged with the share kept before (see keep_shares)
                    seen = keep_shares(before, seen)
                write(path, c.use_counts(experts), sources, seen if seen is not None else before, c.layouts_chosen)

        cache.keep_counts = keep
        atexit.register(keep)
        _remove_stale(path.parent, sources, path)
    return warmed
