"""The KV-cache policy every backend's cache follows: which slot a token goes to, when a layer grows,
and what a cache must match. The caches (backends/*/cache.py) hold their arrays; this module holds
the rules, so the four of them cannot drift apart.

A layer's cache is `slots` rows of (key [nKV, hd], value [nKV, hd], position). A global layer starts
with the capacity the session asks for and, when a sequence outgrows it, grows to at least twice its
slots; token t sits in row t. A sliding-window layer is a ring of `window` rows: the token at
position p sits in row p % window, so its memory stops growing. Position `EMPTY` (-1) marks a row that
holds nothing yet. Keys and values are stored as `LayerSpec.dtype`, one of STORAGE ('f16', 'q8_0',
'bf16', 'f32': what `load(kv_dtype=)` chooses among a backend's `kv_dtypes`); attention reads them back
in its own precision.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

#: the position of a row that holds no token
EMPTY = -1

#: storage types: bytes of one stored key or value element (q8_0: ggml's blocks of 32 values, 34 bytes:
#: an f16 scale and 32 int8, as llama.cpp's --cache-type-k/v q8_0); the row positions are not counted
STORAGE = {"f16": 2.0, "q8_0": 34 / 32, "bf16": 2.0, "f32": 4.0}
#: the other names of the float types (numpy, torch and jax spell them out)
ALIASES = {"float16": "f16", "fp16": "f16", "half": "f16", "bfloat16": "bf16", "float32": "f32", "fp32": "f32"}
#: the float types as numpy / torch / jax name them
FRAMEWORK_DTYPE = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


def storage(dtype: str) -> str:
    """The canonical storage type of `dtype` ('float16' -> 'f16'); InputError naming the choices."""
    name = ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in STORAGE:
        raise InputError(f"kv_dtype={dtype!r}: KV cache storage types are {', '.join(STORAGE)}")
    return name


def bytes_per_token(config, dtype: str = "f16") -> int:
    """Bytes one token adds to every layer's cache together (keys and values) while no ring is full."""
    return int(round(2 * config.kv_dim * STORAGE[storage(dtype)] * config.num_hidden_layers))


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's cache holds: nKV heads of head_dim, a ring of `window` rows (None: global),
    keys and values stored as `dtype`."""

    n_kv: int
    head_dim: int
    window: int | None
    dtype: str = "f32"   # a STORAGE type

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", storage(self.dtype))

    @property
    def framework_dtype(self) -> str:
        """The numpy / torch / jax name of a float storage type ('f16' -> 'float16')."""
        return FRAMEWORK_DTYPE[self.dtype]

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


def layer_specs(config, dtype: str = "f32") -> list[LayerSpec]:
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


class LayeredCache:
    """What a backend's KV cache made of per-layer caches shares: its size and rewinding (the prompt
    cache, st_sdk.generation.prompt_cache). Subclasses set `self.layers`, each with `nbytes`,
    `can_truncate(n)` and `truncate(n)`."""

    layers: list

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def truncate(self, n: int) -> bool:
        """Keep only positions < n; False (and nothing changed) when a sliding-window ring already
        dropped some of them."""
        if not all(layer.can_truncate(n) for layer in self.layers):
            return False
        for layer in self.layers:
            layer.truncate(n)
        return True
