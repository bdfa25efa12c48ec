"""The KV-cache policy every backend's cache follows: which slot a token goes to, when a layer grows,
and what a cache must match. The caches (backends/*/cache.py) hold their arrays; this module holds
the rules, so the four of them cannot drift apart.

A layer's cache is `slots` rows of (key [nKV, hd], value [nKV, hd], position). A global layer starts
with the capacity the session asks for and, when a sequence outgrows it, grows to at least twice its
slots; token t sits in row t. A sliding-window layer is a ring of `window` rows: the token at
position p sits in row p % window, so its memory stops growing. Position `EMPTY` (-1) marks a row that
holds nothing yet. Keys and values are stored in `LayerSpec.dtype` (a backend's compute dtype by
default); attention reads them back in its own precision.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

#: the position of a row that holds no token
EMPTY = -1


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's cache holds: nKV heads of head_dim, a ring of `window` rows (None: global),
    keys and values stored as `dtype`."""

    n_kv: int
    head_dim: int
    window: int | None
    dtype: str = "float32"

    def initial_slots(self, capacity: int) -> int:
        """Rows a layer starts with: its window (a ring), else the capacity asked for (at least 1)."""
        return self.window if self.window else max(int(capacity), 1)

    def check(self, n_kv: int, head_dim: int, window: int | None, what: str = "attention") -> None:
        """InputError unless keys of n_kv heads x head_dim for a layer of `window` fit this cache."""
        if (n_kv, head_dim) != (self.n_kv, self.head_dim):
            raise InputError(f"{what}: the KV cache holds {self.n_kv} kv heads x {self.head_dim} dims, the keys "
                             f"have {n_kv} x {head_dim}; make the cache with this model's new_cache()/session()")
        if (window or None) != self.window:
            raise InputError(f"{what}: window {window} does not match the cache's {self.window}")


def layer_specs(config, dtype: str = "float32") -> list[LayerSpec]:
    """The spec of every layer of a model of `config`, keys and values stored as `dtype`."""
    return [LayerSpec(config.num_key_value_heads, config.head_dim, config.layer_window(i) or None, dtype)
            for i in range(config.num_hidden_layers)]


def grown_slots(slots: int, need: int) -> int:
    """Rows a global layer of `slots` rows grows to when it must hold `need`: at least twice as many."""
    return max(int(need), 2 * int(slots))


def ring_slot(position, window: int):
    """The row of a ring of `window` rows that holds the token at `position` (scalar or array)."""
    return position % window


def ring_keep(n_new: int, window: int) -> int:
    """Of `n_new` tokens written to a ring at once, the first one that survives: only the last
    `window` stay (the older ones would be overwritten by the newer in the same write)."""
    return max(0, int(n_new) - window)
