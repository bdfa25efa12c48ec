"""KV cache of the C backend, following st_sdk.kv's policy (global layers grow, sliding-window layers
are rings indexed by position % window), stored as f16 (default), q8_0 or f32 in the kernels' blocked
layout (csrc/st_attention.h) in numpy byte buffers that the C kernels write through one `st_kv`
struct per layer. The struct's `length` is the source of truth."""
from __future__ import annotations

import numpy as np

from st_sdk import kv

from ..numpy.cache import LayerKV as _ReferenceLayerKV, ordered_state
from .ops import check, ffi_lib

#: storage types and their codes (csrc/st_kernels.h), the default first
KV_DTYPES = {"f16": 1, "q8_0": 3, "f32": 0}
BLOCK = 16   # ST_KV_BLOCK: slots come in blocks of this many positions


def _blocks(n: int) -> int:
    return -(-max(int(n), 1) // BLOCK) * BLOCK


class CLayerKV:
    def __init__(self, structs, index: int, spec: kv.LayerSpec, capacity: int):
        self.spec = spec
        self.window = spec.window
        self._structs = structs              # keeps the C structs alive as long as any layer is used
        self.kv = structs + index            # st_kv * for the kernels
        self.kv.dtype = KV_DTYPES[spec.dtype]
        self._alloc(_blocks(spec.initial_slots(capacity)), copy_from=None)   # a ring: its window, rounded up
        self.kv.window = int(spec.window or 0)
        self.kv.length = 0

    def _alloc(self, cap: int, copy_from) -> None:
        ffi, lib = ffi_lib()
        nbytes = lib.st_kv_bytes(KV_DTYPES[self.spec.dtype], cap, self.spec.n_kv, self.spec.head_dim)
        k, v = np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        pos = np.full(cap, kv.EMPTY, np.int64)
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

    def reserve(self, n_new: int) -> None:
        """Room for n_new more tokens (global layers grow; rings never need to)."""
        if self.window:
            return
        need = self.length + n_new
        if need > len(self.pos):
            self._alloc(_blocks(kv.grown_slots(len(self.pos), need)), copy_from=(self.k, self.v, self.pos))

    def entries(self):
        """(k, v, positions) of every stored token as float32 [n, n_kv, hd], unordered: the values as
        stored (rounded to the storage type)."""
        ffi, lib = ffi_lib()
        n = len(self.pos) if self.window else self.length
        shape = (n, self.spec.n_kv, self.spec.head_dim)
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        if n:
            check(lib.st_kv_read(self.kv, self.spec.n_kv, self.spec.head_dim, n, ffi.cast("float *", k.ctypes.data),
                                 ffi.cast("float *", v.ctypes.data)), "KV cache read")
        valid = self.pos[:n] != kv.EMPTY
        return k[valid], v[valid], self.pos[:n][valid]

    #: whether positions < n are all still held (a ring that wrapped lost some): the reference's rule
    can_truncate = _ReferenceLayerKV.can_truncate

    def truncate(self, n: int) -> None:
        """Forget positions >= n (check can_truncate first)."""
        self.pos[self.pos >= n] = kv.EMPTY
        self.kv.length = min(self.length, n)

    def restore(self, k, v, pos, n: int) -> None:
        """Write float32 k, v [m, n_kv, hd] of positions `pos` (what entries() gave, in position order)
        into this empty layer, rounded to its storage type, as a sequence of n tokens."""
        ffi, lib = ffi_lib()
        if len(pos):
            if self.window:
                slots = kv.ring_slot(np.asarray(pos, np.int64), self.window)
            else:
                self.reserve(len(pos))
                slots = np.arange(len(pos), dtype=np.int64)
            k, v = (np.ascontiguousarray(x, np.float32) for x in (k, v))
            pos = np.ascontiguousarray(pos, np.int64)
            check(lib.st_kv_write(self.kv, self.spec.n_kv, self.spec.head_dim, len(pos),
                                  ffi.cast("const int64_t *", slots.ctypes.data), ffi.cast("const int64_t *", pos.ctypes.data),
                                  ffi.cast("const float *", k.ctypes.data), ffi.cast("const float *", v.ctypes.data)),
                  "KV cache write")
        self.kv.length = n

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes


class CKVCache(kv.LayeredCache):
    def __init__(self, config, capacity: int, dtype: str = "f16"):
        ffi, _ = ffi_lib()
        self.specs = kv.layer_specs(config, dtype)
        self.dtype = self.specs[0].dtype if self.specs else kv.storage(dtype)
        self.structs = ffi.new("st_kv[]", len(self.specs))   # contiguous: st_forward takes the array
        self.layers = [CLayerKV(self.structs, i, spec, capacity) for i, spec in enumerate(self.specs)]
        self._fits = None   # the last config `check` passed (configs are frozen)

    def check(self, config) -> None:
        """InputError unless this cache was made for `config`'s layers, heads and windows: the kernels
        index it with the config's sizes."""
        from st_sdk.errors import InputError

        if config is self._fits:
            return
        if [(s.n_kv, s.head_dim, s.window) for s in self.specs] != \
                [(s.n_kv, s.head_dim, s.window) for s in kv.layer_specs(config)]:
            raise InputError("KV cache was made for a different model shape (layers, kv heads, head_dim or "
                             "windows); make it with this model's new_cache()/session()")
        self._fits = config

    def reserve(self, n_new: int) -> None:
        for layer in self.layers:
            layer.reserve(n_new)

    def state(self):
        return ordered_state(self.layers)

    def restore(self, state, n: int) -> None:
        for layer, (k, v, pos) in zip(self.layers, state):
            layer.restore(k, v, pos, n)
