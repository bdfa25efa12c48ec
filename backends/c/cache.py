"""KV cache of the C backend: the same policy as the reference (global layers grow, sliding-window
layers are rings indexed by position % window), stored as f16 (default), q8_0 or f32 in the kernels'
blocked layout (csrc/st_attention.h) in numpy byte buffers that the C kernels write through one
`st_kv` struct per layer. The struct's `length` is the source of truth."""
from __future__ import annotations

import numpy as np

from .ops import ffi_lib

#: storage types and their codes (csrc/st_kernels.h), the default first
KV_DTYPES = {"f16": 1, "q8_0": 3, "f32": 0}
BLOCK = 16   # ST_KV_BLOCK: slots come in blocks of this many positions


def _blocks(n: int) -> int:
    return -(-max(int(n), 1) // BLOCK) * BLOCK


class CLayerKV:
    def __init__(self, structs, index: int, n_kv: int, head_dim: int, window: int | None, capacity: int,
                 dtype: str = "f16"):
        self.window = window or None
        self.dtype = dtype
        self.shape = (n_kv, head_dim)        # kv heads x head_dim of every slot
        self._structs = structs              # keeps the C structs alive as long as any layer is used
        self.kv = structs + index            # st_kv * for the kernels
        self.kv.dtype = KV_DTYPES[dtype]
        self._alloc(_blocks(window if window else capacity), copy_from=None)
        self.kv.window = int(window or 0)
        self.kv.length = 0

    def _alloc(self, cap: int, copy_from) -> None:
        ffi, lib = ffi_lib()
        nbytes = lib.st_kv_bytes(KV_DTYPES[self.dtype], cap, *self.shape)
        k, v = np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        pos = np.full(cap, -1, np.int64)
        if copy_from is not None:   # blocks are outermost: the old buffers are a prefix of the new
            ok, ov, opos = copy_from
            k[:len(ok)], v[:len(ov)], pos[:len(opos)] = ok, ov, opos
        self.k, self.v, self.pos = k, v, pos
        self.kv.k = ffi.cast("void *", k.ctypes.data)
        self.kv.v = ffi.cast("void *", v.ctypes.data)
        self.kv.pos = ffi.cast("int64_t *", pos.ctypes.data)
        self.kv.cap = cap

    @property
    def length(self) -> int:
        return int(self.kv.length)

    @property
    def capacity(self) -> int:
        return len(self.pos)

    def reserve(self, n_new: int) -> None:
        """Room for n_new more tokens (global layers grow by doubling; rings never need to)."""
        if self.window:
            return
        need = self.length + n_new
        if need > len(self.pos):
            self._alloc(_blocks(max(need, 2 * len(self.pos))), copy_from=(self.k, self.v, self.pos))

    def entries(self):
        """(k, v, positions) of every stored token as float32 [n, n_kv, hd], unordered (the stored
        values: rounded to the storage type)."""
        ffi, lib = ffi_lib()
        n = len(self.pos) if self.window else self.length
        k = np.empty((n, *self.shape), np.float32)
        v = np.empty((n, *self.shape), np.float32)
        if n:
            from .ops import check

            check(lib.st_kv_read(self.kv, *self.shape, n, ffi.cast("float *", k.ctypes.data),
                                 ffi.cast("float *", v.ctypes.data)), "KV cache read")
        valid = self.pos[:n] >= 0
        return k[valid], v[valid], self.pos[:n][valid]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes


def cache_signature(config) -> tuple:
    n = config.num_hidden_layers
    return (n, config.num_key_value_heads, config.head_dim, tuple(config.layer_window(i) or 0 for i in range(n)))


class CKVCache:
    def __init__(self, config, capacity: int, dtype: str = "f16"):
        ffi, _ = ffi_lib()
        n = config.num_hidden_layers
        self.dtype = dtype
        self.structs = ffi.new("st_kv[]", n)   # contiguous: st_forward takes the array
        self.layers = [CLayerKV(self.structs, i, config.num_key_value_heads, config.head_dim,
                                config.layer_window(i), capacity, dtype) for i in range(n)]
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

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
