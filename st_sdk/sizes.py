"""Byte sizes as people write and read them ('1GiB', '512 MiB')."""
from __future__ import annotations

import re

from .errors import InputError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: str | int, name: str = "max_memory") -> int:
    """'1GiB', '512 MB', '8g' or a number of bytes -> bytes."""
    if isinstance(size, bool):
        raise InputError(f"{name}: expected a size such as '1GiB', got {size!r}")
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(f"{name}: cannot read {size!r} as a size (examples: '1GiB', '512MiB', '8GB')")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise InputError(f"{name}: must be positive, got {size!r}")
    return value


def tree_bytes(path) -> int:
    """Bytes held by the files at or under `path` (links not followed; files that vanish or cannot be
    read count nothing)."""
    import os

    if os.path.islink(path) or not os.path.isdir(path):
        try:
            return os.lstat(path).st_size
        except OSError:
            return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def weight_bytes_per_token(params, cfg) -> dict[str, int]:
    """The weight bytes one decode step reads, by weight: one embedding row ("embed"), the final norm
    ("norm") and the head, and each layer weight summed over the layers ("wq", ..., "router"), of the
    experts ("gate", "up", "down") k of E."""
    k, E = cfg.moe_num_active_primary_experts, cfg.moe_num_primary_experts
    out = {"embed": params.embed.raw.nbytes // cfg.vocab_size, "norm": params.norm.raw.nbytes,
           "head": params.head.raw.nbytes}
    for f in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "router", "gate", "up", "down"):
        total = sum(getattr(lp, f).raw.nbytes for lp in params.layers)
        out[f] = int(total * k // E if f in ("gate", "up", "down") else total)
    return out


def bytes_per_token(params, cfg) -> int:
    """Weight bytes one decode step reads: dense parts of every layer, k of E experts, the final norm,
    one embedding row and the head (weight_bytes_per_token summed)."""
    return int(sum(weight_bytes_per_token(params, cfg).values()))
