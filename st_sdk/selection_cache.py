"""The measured-selection cache: decode timings per backend, on disk, keyed by what changes them.

One JSON file in the user cache directory (platformdirs; `ST_SDK_CACHE_DIR` overrides it). It also
remembers which backends passed their smoke run on this installation (`probes`), so a plain load does
not recompile a jit backend's micro model every time. Each measurement entry is keyed by a hash of `cache_key(...)`: CPU model and flags, cores, GPUs and driver, SDK and library
versions, thread environment variables, model shape, weight format, dtype and thread request. Writes
are atomic (temp file + rename); a corrupt file is ignored with a warning and replaced at next write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .environment import cache_dir, library_versions, replaced_when_written

log = logging.getLogger("st_sdk")

FILE_NAME = "selection.json"
SCHEMA = 1
#: environment variables that change how fast (or how) a backend computes
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS", "XLA_FLAGS", "ST_NUM_THREADS", "ST_C_VARIANT", "CUDA_VISIBLE_DEVICES")
#: the config fields that make a model's shape (others, like token ids, do not change speed)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "moe_num_primary_experts", "moe_num_active_primary_experts", "moe_ffn_hidden_size",
                "rope_layout", "sliding_window_layout", "sliding_window_size", "tie_word_embeddings")
#: libraries whose version changes a backend's speed or results (read from metadata, never imported)
LIBRARIES = ("numpy", "cffi", "torch", "jax", "jaxlib")


def cache_path() -> Path:
    return cache_dir() / FILE_NAME


def model_shape(config) -> dict[str, Any]:
    if config is None:
        return {}
    return {f: (list(v) if isinstance(v, tuple) else v) for f in SHAPE_FIELDS
            for v in [getattr(config, f, None)]}


def cache_key(hardware, config, weight_format: str, backends: dict[str, str], dtype: str | None = None,
              n_threads: int | None = None) -> dict[str, Any]:
    """Everything that changes speed or results, and nothing else. `backends`: name -> version."""
    from . import __version__

    return {
        "schema": SCHEMA,
        "cpu": hardware.cpu_model, "machine": hardware.machine, "features": sorted(hardware.features),
        "physical_cores": hardware.physical_cores, "logical_cores": hardware.logical_cores,
        "gpus": sorted(f"{g.kind}:{g.name}:{g.driver}" for g in hardware.gpus),
        "sdk": __version__, "libraries": {k: v for k, v in library_versions(LIBRARIES).items() if v},
        "backends": dict(sorted(backends.items())),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "model": model_shape(config), "weight_format": weight_format,
        "dtype": dtype, "n_threads": n_threads,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_doc(path: Path) -> dict:
    """The whole cache document ({"schema", "entries", "probes"}), or an empty one."""
    empty = {"schema": SCHEMA, "entries": {}, "probes": {}}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return empty
    except OSError as e:
        log.warning("st-sdk: cannot read the selection cache %s (%s); ignoring it", path, e)
        return empty
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict) \
                or not isinstance(data.get("probes", {}), dict):
            raise ValueError("unexpected layout")
        return {**empty, **data}
    except ValueError as e:
        log.warning("st-sdk: the selection cache %s is corrupt (%s); ignoring it, it will be rebuilt", path, e)
        return empty


MAX_ENTRIES = 256   # per section; the oldest go first (keys change with every upgrade or edit)


def _write_doc(path: Path, doc: dict) -> None:
    for section in ("entries", "probes"):
        items = doc.get(section, {})
        if len(items) > MAX_ENTRIES:
            keep = sorted(items, key=lambda h: items[h].get("created", 0) if isinstance(items[h], dict) else 0)
            doc[section] = {h: items[h] for h in keep[-MAX_ENTRIES:]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".selection-", suffix=".json", dir=path.parent)
    with replaced_when_written(tmp, path), os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def _normal(key: dict) -> dict:
    return json.loads(json.dumps(key, default=str))


def load(key: dict) -> dict | None:
    """The cached measurement for this key: {"timings": {backend: {...}}, "created": ...} or None."""
    entry = _read_doc(cache_path())["entries"].get(key_hash(key))
    if not isinstance(entry, dict) or entry.get("key") != _normal(key) or not isinstance(entry.get("timings"), dict):
        return None
    return entry


def store(key: dict, timings: dict[str, dict]) -> Path:
    """Add (or replace) the entry for this key, atomically; returns the cache file."""
    path = cache_path()
    doc = _read_doc(path)
    doc["entries"][key_hash(key)] = {"key": key, "timings": timings, "created": time.time()}
    _write_doc(path, doc)
    return path


def probe_key(hardware, backend: str, version: str, weight_format: str, dtype=None, n_threads=None) -> dict:
    """What a smoke run's verdict depends on: the machine, the versions, the backend and its settings."""
    key = cache_key(hardware, None, weight_format, {backend: version}, dtype, n_threads)
    key.pop("model")
    return key


def probe_passed(key: dict) -> bool:
    """True when a smoke run with this key passed before (failures are never cached: they rerun)."""
    entry = _read_doc(cache_path())["probes"].get(key_hash(key))
    return isinstance(entry, dict) and entry.get("key") == _normal(key) and entry.get("passed") is True


def store_probe_pass(key: dict) -> None:
    path = cache_path()
    doc = _read_doc(path)
    doc["probes"][key_hash(key)] = {"key": key, "passed": True, "created": time.time()}
    try:
        _write_doc(path, doc)
    except OSError as e:
        log.debug("st-sdk: cannot write the selection cache (%s)", e)


def clear() -> bool:
    """Delete the cache file; True when there was one."""
    try:
        cache_path().unlink()
        return True
    except FileNotFoundError:
        return False
