"""KV cache of the C backend: the same policy as the reference (global layers grow, sliding-window
layers are rings of `window` slots indexed by position % window), held in numpy arrays that the C
kernels write through one `st_kv` struct per layer. The struct's `length` is the source of truth."""
from __future__ import annotations

import numpy as np

from ..numpy.cache import LayerKV as _ReferenceLayerKV, ordered_state
from .ops import ffi_lib


class CLayerKV:
    def __init__(self, structs, index: int, n_kv: int, head_dim: int, window: int | None, capacity: int):
        self.window = window or None
        self._structs = structs              # keeps the C structs alive as long as any layer is used
        self.kv = structs + index            # st_kv * for the kernels
        self._shape = (n_kv, head_dim)
        self._alloc(window if window else max(int(capacity), 1), copy_from=None)
        self.kv.window = int(window or 0)
        self.kv.length = 0

    def _alloc(self, cap: int, copy_from) -> None:
        ffi, _ = ffi_lib()
        k = np.zeros((cap, *self._shape), np.float32)
        v = np.zeros((cap, *self._shape), np.float32)
        pos = np.full(cap, -1, np.int64)
        if copy_from is not None:
            n = len(copy_from[2])
            k[:n], v[:n], pos[:n] = copy_from
        self.k, self.v, self.pos = k, v, pos
        self.kv.k = ffi.cast("float *", k.ctypes.data)
        self.kv.v = ffi.cast("float *", v.ctypes.data)
        self.kv.pos = ffi.cast("int64_t *", pos.ctypes.data)
        self.kv.cap = cap

    @property
    def length(self) -> int:
        return int(self.kv.length)

    def reserve(self, n_new: int) -> None:
        """Room for n_new more tokens (global layers grow by doubling; rings never need to)."""
        if self.window:
            return
        need = self.length + n_new
        if need > len(self.pos):
            self._alloc(max(need, 2 * len(self.pos)), copy_from=(self.k, self.v, self.pos))

    #: (k, v, positions) of every stored token, unordered: the reference cache's own reader
    entries = _ReferenceLayerKV.entries
    can_truncate = _ReferenceLayerKV.can_truncate

    def truncate(self, n: int) -> None:
        self.pos[self.pos >= n] = -1
        self.kv.length = min(self.length, n)

    def restore(self, k, v, pos, n: int) -> None:
        if self.window:
            slots = pos % self.window
        else:
            self.reserve(len(pos))
            slots = np.arange(len(pos))
        self.k[slots], self.v[slots], self.pos[slots] = k, v, pos
        self.kv.length = n

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes


def cache_signature(config) -> tuple:
    n = config.num_hidden_layers
    return (n, config.num_key_value_heads, config.head_dim, tuple(config.layer_window(i) or 0 for i in range(n)))


class CKVCache:
    def __init__(self, config, capacity: int):
        ffi, _ = ffi_lib()
        n = config.num_hidden_layers
        self.structs = ffi.new("st_kv[]", n)   # contiguous: st_forward takes the array
        self.layers = [CLayerKV(self.structs, i, config.num_key_value_heads, config.head_dim,
                                config.layer_window(i), capacity) for i in range(n)]
        self.signature = cache_signature(config)

    def check(self, config) -> None:
        """InputError unless this cache was made for `config`'s layers, heads and windows: the kernels
        index it with the config's sizes."""
        from st_sdk.errors import InputError

        if self.signature != cache_signature(config):
            raise InputError("KV cache was made for a different model shape (layers, kv heads, head_dim or "
                             "windows); make it with this model's new_cache()/session()")

    def reserve(self, n_new: int) -> None:
        for layer in self.layers:
            layer.reserve(n_new)

    def truncate(self, n: int) -> bool:
        if not all(layer.can_truncate(n) for layer in self.layers):
            return False
        for layer in self.layers:
            layer.truncate(n)
        return True

    def state(self):
        return ordered_state(self.layers)

    def restore(self, state, n: int) -> None:
        for layer, (k, v, pos) in zip(self.layers, state):
            layer.restore(k, v, pos, n)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
