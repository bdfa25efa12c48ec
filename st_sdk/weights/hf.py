"""HF checkpoints: config.json plus safetensors (one file or shards listed in an index), memory-mapped.

The `safetensors` package's numpy loader copies every tensor and knows no bfloat16, so reading parses
the header (8-byte little-endian length + JSON) and maps the data region with `np.memmap`. Writing
streams tensor by tensor (the package's writer needs every tensor in memory at once).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import WeightError
from . import validate
from .tensor import WeightTensor
from .watch import WatchedFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: safetensors dtype -> our format (only these are supported)
DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
FMT_TO_DTYPE = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
STORAGE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}   # bf16 as raw bits
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict without __metadata__, offset of the data region)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise WeightError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n), object_pairs_hook=validate.no_duplicate_keys)
        except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, a duplicate key
            raise WeightError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file: every entry validated against the file size, data memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightError(f"{self.path}: weight file not found")
        self.watched = WatchedFile(self.path)   # the file's identity when mapped: see Model.check_files
        self.header, self.data_start = read_header(self.path)
        data_len = self.watched.size - self.data_start
        validate.safetensors_header(self.path, self.header, data_len)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start,
                              shape=(data_len,)) if data_len else np.zeros(0, np.uint8)

    def names(self) -> list[str]:
        return list(self.header)

    def tensor(self, name: str) -> WeightTensor:
        e = self.header[name]
        fmt = DTYPES.get(e["dtype"])
        if fmt is None:
            raise WeightError(f"{self.path}: tensor '{name}' has unsupported type {e['dtype']}; "
                              f"supported: {', '.join(DTYPES)}")
        begin, end = e["data_offsets"]
        shape = tuple(int(d) for d in e["shape"])
        data = self._map[begin:end].view(STORAGE[fmt]).reshape(shape)
        return WeightTensor(name, fmt, shape, data, str(self.path))


class HFCheckpoint:
    """The safetensors of an HF directory: `get(name)` returns a memory-mapped WeightTensor."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError, RecursionError, OSError):
                raise WeightError(f"{index}: malformed index (expected a JSON object with 'weight_map')") from None
            self.files = {}
            for shard in weight_map.values():
                validate.shard_path(self.dir, shard, index)
            for shard in dict.fromkeys(weight_map.values()):
                p = validate.shard_path(self.dir, shard, index)
                if not p.is_file():
                    raise WeightError(f"{p}: shard listed in {index.name} is missing")
                self.files[shard] = SafetensorsFile(p)
            self.where = {}
            for name, shard in weight_map.items():
                if name not in self.files[shard].header:
                    raise WeightError(f"{self.dir / shard}: tensor '{name}' listed in {index.name} is not in the shard")
                self.where[name] = self.files[shard]
        elif (self.dir / SINGLE).is_file():
            f = SafetensorsFile(self.dir / SINGLE)
            self.files = {SINGLE: f}
            self.where = {n: f for n in f.names()}
        else:
            raise WeightError(f"{self.dir}: no {SINGLE} or {INDEX} found")

    def get(self, name: str) -> WeightTensor:
        f = self.where.get(name)
        if f is None:
            raise WeightError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        return f.tensor(name)

    def names(self) -> list[str]:
        return list(self.where)

    def file_size(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())


# ---- writing -------------------------------------------------------------------------------------
def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(names: list[str], nbytes: dict[str, int], shards: int) -> list[list[str]]:
    """Split names, in order, into `shards` contiguous groups of similar byte size."""
    shards = max(1, min(shards, len(names)))
    total = sum(nbytes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for n in names:
        g = min(shards - 1, acc * shards // max(total, 1))
        groups[g].append(n)
        acc += nbytes[n]
    return [g for g in groups if g] or [[]]


class SafetensorsWriter:
    """Stream tensors into one safetensors file, or `shards` files plus an index. Every tensor is
    declared up front (name -> (fmt, shape)); `write(name, array)` then takes them in any order."""

    def __init__(self, directory: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]], shards: int = 1):
        self.dir = Path(directory)
        self.specs = specs
        self.nbytes = {n: int(np.prod(s)) * ITEMSIZE[f] for n, (f, s) in specs.items()}
        groups = plan_shards(list(specs), self.nbytes, shards)
        self.files = [self.dir / f for f in shard_names(len(groups))]
        self.where: dict[str, tuple[int, int]] = {}   # name -> (file index, absolute offset)
        self.handles = []
        for gi, group in enumerate(groups):
            header, off = {}, 0
            for n in group:
                f, s = specs[n]
                header[n] = {"dtype": FMT_TO_DTYPE[f], "shape": list(s), "data_offsets": [off, off + self.nbytes[n]]}
                off += self.nbytes[n]
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)   # keeps the data region 8-byte aligned
            fh = open(self.files[gi], "wb")
            fh.write(struct.pack("<Q", len(blob)) + blob)
            fh.truncate(8 + len(blob) + off)
            self.handles.append(fh)
            for n in group:
                self.where[n] = (gi, 8 + len(blob) + header[n]["data_offsets"][0])

    def write(self, name: str, arr: np.ndarray) -> int:
        gi, pos = self.where[name]
        fmt = self.specs[name][0]
        arr = np.ascontiguousarray(arr)
        if arr.nbytes != self.nbytes[name] or arr.dtype != STORAGE[fmt]:
            raise WeightError(f"{self.files[gi]}: data for tensor '{name}' is {arr.dtype}{list(arr.shape)}, "
                              f"expected {fmt}{list(self.specs[name][1])}")
        self.handles[gi].seek(pos)
        self.handles[gi].write(arr.tobytes())
        return arr.nbytes

    def close(self) -> list[Path]:
        for fh in self.handles:
            fh.close()
        self.handles = []
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(self.nbytes.values())},
                     "weight_map": {n: self.files[gi].name for n, (gi, _) in self.where.items()}}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2))
        return self.files
