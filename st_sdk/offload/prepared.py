"""Prepared expert files: every expert of a model written once in the layout the backend computes on,
one after another at the cache's slot stride, so that budget mode reads an expert straight into its
slot (O_DIRECT where the filesystem allows it, in aligned pieces read in parallel): no conversion on
the I/O threads and no copy out of a read buffer. On two cores that conversion competes with the
compute threads and delays the reads the compute waits for. Measured (docs/memory_budget.md): 1.6-1.9x
the speed of converting as read on an AVX2 host with either routing; 0.9-1.2x on an AVX-512 one, whose
faster disk left less to gain.

The file lives in the st-sdk cache directory (`ST_SDK_CACHE_DIR`, else the platform's user cache
directory), under `experts/`. Its name comes from the model file's name and a hash of everything that
decides its bytes: the model files' paths, sizes and modification times, the slot stride, and each
layer's stored part sizes and layouts. A model file changed since, or another backend's layout, gets
a new name. Its header records the model files it was made from (path, size, modification time), so
a file whose model changed or is gone, or that another version of st-sdk wrote, is known to be stale:
writing a model's new file removes that model's stale ones and the pieces interrupted writes left
(`clean`), and `st-sdk cache` lists the directory, with the expert use counts kept there
(st_sdk.offload.profile), and cleans it (`scan`). Any file can be deleted at
any time: a later load writes it again where it is worth writing.

`st_sdk.load(..., max_memory=..., expert_file=...)`:

    "auto"  (the default) use the prepared file if one exists; else, when the backend converts the
            experts it reads (the C backend repacks them) and the disk keeps room to spare (a tenth
            of itself, at most AUTO_FREE_CAP: `auto_free_bytes`), write it
            first (once: later loads read it), logged with its path and size; where the room is there
            only without the same model's files in other layouts (an earlier load's, before the live
            shares it kept chose new ones), those are removed first, each logged; else convert each
            expert as it is read
    True    write it first when it is missing, if the disk has room for it and FREE_MARGIN more (a
            progress bar on a terminal); when the disk lacks room or the write fails, a warning says
            why and the experts are converted as they are read
    False   never use one: experts are converted as they are read
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..sizes import fmt_bytes
from .cache import ExpertCache
from .files import Entry, source_files, sources_changed, write_state
from .pages import anonymous

log = logging.getLogger("st_sdk.offload")

MAGIC = b"STSDKXP1"
HEADER = 4096          # the header block; experts start here, each at a multiple of the stride
VERSION = 2            # 2: the header records the model files' sizes and modification times
FREE_MARGIN = 256 * 2**20   # room left on the disk after writing one
AUTO_FREE_SHARE = 0.1       # "auto" writes one only when this share of the disk stays free after it,
AUTO_FREE_CAP = 16 * 2**30  # or this much, where that is less (a tenth of a large disk is more than needed)


def check_mode(value) -> bool | str:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value == "auto":
        return "auto"
    raise InputError(f"expert_file: expected 'auto', True or False, got {value!r}")


def _describe(layout) -> str:
    """A layout as text that changes when its bytes would (None: the experts as stored)."""
    if layout is None:
        return "stored"
    if is_dataclass(layout):
        items = [(f.name, getattr(layout, f.name)) for f in fields(layout)]
    else:
        items = sorted(vars(layout).items())
    return f"{type(layout).__module__}.{type(layout).__qualname__}{items!r}"


def signature(cache: ExpertCache, experts: int) -> dict:
    """Everything that decides a prepared file's bytes, and where they come from."""
    return {"version": VERSION, "files": source_files(cache, experts), "experts": experts, "stride": int(cache._stride),
            "layers": [[[int(stored), _describe(lay), int(off)] for stored, lay, off in zip(parts, lays, offsets)]
                       for parts, lays, offsets in zip(cache.part_bytes, cache.layouts, cache.offsets)]}


def _digest(sig: dict) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def path_for(sig: dict, directory: Path | None = None) -> Path:
    from ..environment import cache_dir

    digest = _digest(sig)[:20]
    stem = Path(sig["files"][0][0]).stem if sig["files"] else "model"
    return Path(directory or cache_dir() / "experts") / f"{stem}.{digest}.stx"


def data_bytes(sig: dict) -> int:
    return len(sig["layers"]) * sig["experts"] * sig["stride"]


def _header(sig: dict) -> bytes:
    body = json.dumps({"signature": _digest(sig), "version": sig["version"],
                       "stride": sig["stride"], "layers": len(sig["layers"]), "experts": sig["experts"],
                       "sources": sig["files"]}, sort_keys=True).encode()
    head = MAGIC + len(body).to_bytes(4, "little") + body
    if len(head) > HEADER:
        raise ValueError(f"the model files' names take {len(head)} bytes, more than a prepared file's "
                         f"{HEADER}-byte header holds")
    return head + bytes(HEADER - len(head))


def is_valid(path: Path, sig: dict) -> bool:
    """True when `path` is a complete prepared file for `sig`."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return head == _header(sig) and size == HEADER + data_bytes(sig)


def write(cache: ExpertCache, experts: int, sig: dict, path: Path, progress: bool = True,
          io_threads: int = 4) -> None:
    """Write every expert in the cache's layouts to `path` (through a temporary file renamed at the end;
    O_DIRECT writes where allowed, so neither file fills the page cache). OSError when the disk lacks
    room or a write fails; nothing is left behind then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    need = HEADER + data_bytes(sig)
    free = shutil.disk_usage(path.parent).free
    if free < need + FREE_MARGIN:
        raise OSError(f"{path.parent}: {free / 2**30:.2f} GiB free, the prepared expert file needs "
                      f"{need / 2**30:.2f} GiB (and {FREE_MARGIN // 2**20} MiB left over)")
    layers, stride = len(sig["layers"]), sig["stride"]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o644)
    dfd = None
    if hasattr(os, "O_DIRECT"):
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            dfd = None
    local = threading.local()
    direct = {"fd": dfd}   # None once the filesystem refuses an O_DIRECT write

    def one(index: int) -> int:
        layer, e = divmod(index, experts)
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = anonymous(stride)
        row = np.frombuffer(buf, np.uint8)
        offsets = cache.offsets[layer]
        row[int(offsets[-1]):] = 0
        for part in range(len(offsets) - 1):
            cache._fill((layer, e), part, row[int(offsets[part]):int(offsets[part + 1])])
        at = HEADER + index * stride
        target = direct["fd"]
        if target is not None:
            try:
                done = os.pwrite(target, buf, at)
            except OSError as err:   # refused after all: buffered writes from now on
                if err.errno != errno.EINVAL:
                    raise
                target = direct["fd"] = None
        if target is None:
            done = os.pwrite(fd, buf, at)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, at, stride, os.POSIX_FADV_DONTNEED)
        if done != stride:
            raise OSError(f"{tmp}: short write ({done} of {stride} bytes)")
        return stride

    from ..environment import replaced_when_written
    from ..weights.export import progress_bar

    try:
        with replaced_when_written(tmp, path):
            with ThreadPoolExecutor(io_threads, thread_name_prefix="st-sdk-prepare") as pool:
                bar = progress_bar(need, f"preparing experts ({path.name})") if progress else None
                try:
                    for n in pool.map(one, range(layers * experts)):
                        if bar is not None:
                            bar.update(n)
                finally:
                    if bar is not None:
                        bar.close()
            os.pwrite(fd, _header(sig), 0)
            os.fsync(fd)
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)


def attach(cache: ExpertCache, experts: int, mode: bool | str = "auto", directory: Path | None = None,
           progress: bool = True) -> Path | None:
    """Have `cache` read from the prepared expert file for its model and layouts (after its layouts
    are set): the existing one, or one written now (mode=True; mode="auto" where `worth_writing`).
    Returns its path, or None when the experts are converted as they are read."""
    mode = check_mode(mode)
    if mode is False:
        return None
    sig = signature(cache, experts)
    path = path_for(sig, directory)
    try:
        _header(sig)
    except ValueError as e:
        log.warning("st-sdk: no prepared expert file (%s); experts are converted as they are read", e)
        return None
    if not is_valid(path, sig):
        _remove_stale(path.parent, [f[0] for f in sig["files"]])
        if mode == "auto":
            why = worth_writing(cache, sig, path)
            others = _other_layouts(path, sig) if why else []
            if others and not worth_writing(cache, sig, path, reclaim=sum(e.nbytes for e in others)):
                why = _remove_superseded(others)   # this model's files in other layouts make room for it
            if why:
                if not _converts(cache):   # nothing to convert, nothing lost
                    log.info("st-sdk: no prepared expert file written (%s)", why)
                else:
                    log.warning("st-sdk: no prepared expert file written (%s); experts are converted as they are "
                                "read, on the I/O threads, which slows decoding", why)
                return None
            log.warning("st-sdk: writing the experts once in the backend's layout to %s (%s; later loads read "
                        "them from it; expert_file=False turns this off)", path, fmt_bytes(HEADER + data_bytes(sig)))
        try:
            write(cache, experts, sig, path, progress=progress)
        except OSError as e:
            log.warning("st-sdk: no prepared expert file (%s); experts are converted as they are read", e)
            return None
        if not is_valid(path, sig):
            log.warning("st-sdk: the prepared expert file %s did not check out after writing; experts are "
                        "converted as they are read", path)
            return None
    cache.use_file(str(path), HEADER, experts)
    return path


def _converts(cache: ExpertCache) -> bool:
    """Whether the cache converts experts as it reads them (some part has a layout of its own)."""
    return any(lay is not None for lays in cache.layouts for lay in lays)


def worth_writing(cache: ExpertCache, sig: dict, path: Path, reclaim: int = 0) -> str:
    """Why expert_file="auto" should not write a prepared file now ('' when it should): the cache holds
    every expert as stored (reads already go straight into the slots, nothing to save), the cache
    directory is not writable, or the disk would keep less free than `auto_free_bytes` asks (with
    `reclaim` more bytes free, those of files to be removed first)."""
    if not _converts(cache):
        return "the backend reads the experts as stored"
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK):
        return f"{where} is not writable"
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return f"{where}: {e.strerror}"
    need, keep = HEADER + data_bytes(sig), auto_free_bytes(usage.total)
    if usage.free + reclaim - need < keep:
        return (f"{where}: {usage.free / 2**30:.2f} GiB free, the file needs {need / 2**30:.2f} GiB and "
                f"{keep / 2**30:.2f} GiB of the disk is kept free (a tenth of it, at most "
                f"{AUTO_FREE_CAP / 2**30:.0f} GiB); expert_file=True writes it anyway")
    return ""


def _other_layouts(path: Path, sig: dict) -> list[Entry]:
    """The current prepared files beside `path` made from the same model files, in other layouts (an
    earlier load's, before the live shares it kept chose this load's)."""
    files = {str(f[0]) for f in sig["files"]}
    return [e for e in scan(path.parent) if e.kind == "experts" and e.state == "current" and e.path != path
            and e.path.suffix == ".stx" and set(e.sources) == files]


def _remove_superseded(entries: list[Entry]) -> str:
    """Remove a model's prepared files in other layouts than the one about to be written, where the
    disk lacks room for both (each logged); '' when they are gone, else why not."""
    for e in entries:
        try:
            os.unlink(e.path)
        except OSError as err:
            return f"{e.path}: {err.strerror}"
        log.warning("st-sdk: removed %s (%s), this model's prepared expert file in other layouts, to make room "
                    "for the one in the layouts it is loaded with now", e.path, fmt_bytes(e.nbytes))
    return ""


def auto_free_bytes(total: int) -> int:
    """What expert_file="auto" leaves free on a disk of `total` bytes: a tenth of it, at most
    AUTO_FREE_CAP, at least FREE_MARGIN."""
    return int(max(FREE_MARGIN, min(AUTO_FREE_SHARE * total, AUTO_FREE_CAP)))


# ---- housekeeping: which files are stale, and removing them ----------------------------------------


def read_header(path: Path) -> dict | None:
    """A prepared file's header, or None when the file has none (or cannot be read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError:
        return None
    n = int.from_bytes(head[len(MAGIC):len(MAGIC) + 4], "little")
    if not head.startswith(MAGIC) or len(MAGIC) + 4 + n > len(head):
        return None
    try:
        doc = json.loads(head[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def examine(path: Path) -> Entry:
    """What `path` (a .stx file or an interrupted write's .partial one) is, and whether it is stale."""
    try:
        st = os.stat(path)
    except OSError as e:
        return Entry(path, 0, "stale", f"cannot be read ({e.strerror})")
    partial = _PARTIAL.match(path.name)
    if partial:
        return Entry(path, st.st_size, *write_state(int(partial["pid"]), st.st_mtime))
    head = read_header(path)
    if head is None:
        return Entry(path, st.st_size, "stale", "no prepared-expert header")
    listed = head.get("sources", head.get("files", ()))
    sources = tuple(str(f[0] if isinstance(f, list) and f else f) for f in listed) if isinstance(listed, list) else ()
    if head.get("version") != VERSION:
        return Entry(path, st.st_size, "stale", f"written by another version of st-sdk (format "
                     f"{head.get('version', 1)}; this one reads {VERSION})", sources)
    try:
        want = HEADER + int(head["layers"]) * int(head["experts"]) * int(head["stride"])
        recorded = [(str(src), int(size), int(mtime)) for src, size, mtime in head["sources"]]
    except (KeyError, TypeError, ValueError):
        return Entry(path, st.st_size, "stale", "a damaged header", sources)
    if st.st_size != want:
        return Entry(path, st.st_size, "stale", f"incomplete ({st.st_size} of {want} bytes)", sources)
    why = sources_changed(recorded)
    return Entry(path, st.st_size, "stale" if why else "current", why, sources)


def scan(directory: Path | None = None) -> list[Entry]:
    """Every prepared file and interrupted write in `directory` (default: the cache directory's
    experts/), and the expert use counts kept there (st_sdk.offload.profile), largest first."""
    from ..environment import cache_dir
    from . import profile

    directory = Path(directory or cache_dir() / "experts")
    try:
        found = [p for p in directory.iterdir() if p.is_file()]
    except OSError:
        return []
    entries = [examine(p) for p in found if p.suffix == ".stx" or _PARTIAL.match(p.name)]
    entries += [profile.examine(p) for p in found if profile.is_counts_file(p.name)]
    return sorted(entries, key=lambda e: (-e.nbytes, e.path.name))


def clean(directory: Path | None = None, everything: bool = False, sources: list[str] | None = None) -> list[Entry]:
    """Remove the stale files of `scan(directory)` (`everything`: the current ones too; never one being
    written); with `sources`, only interrupted writes and the files made from one of those model files.
    Returns what was removed; a file that cannot be removed is logged and kept."""
    real = {os.path.realpath(s) for s in sources} if sources else None
    removed = []
    for entry in scan(directory):
        if entry.state == "writing" or (entry.state == "current" and not everything):
            continue
        if real is not None and entry.sources and real.isdisjoint(entry.sources):
            continue
        try:
            os.unlink(entry.path)
        except OSError as e:
            log.warning("st-sdk: could not remove %s (%s)", entry.path, e.strerror)
            continue
        removed.append(entry)
    return removed


def _remove_stale(directory: Path, sources: list[str]) -> None:
    """Before a model's file is written: its stale files (older versions of the model file, or another
    st-sdk's format) and any interrupted write's leftovers go, so they neither fill the disk nor count
    against the room the new file needs."""
    removed = clean(directory, sources=sources)   # one scan of the directory, whatever the number of files
    if removed:
        log.warning("st-sdk: removed %d stale file(s) from %s, %s: %s", len(removed), directory,
                    fmt_bytes(sum(e.nbytes for e in removed)), "; ".join(f"{e.path.name} ({e.why})" for e in removed))


_PARTIAL = re.compile(r"^.+\.stx\.(?P<pid>\d+)\.partial$")
