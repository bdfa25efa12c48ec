"""KV cache of the C backend, following st_sdk.kv's policy (global layers grow, sliding-window layers
are rings of `window` rows indexed by position % window), held in numpy arrays that the C kernels
write through one `st_kv` struct per layer. The struct's `length` is the source of truth. The kernels
store keys and values as float32."""
from __future__ import annotations

import numpy as np

from st_sdk import kv
from st_sdk.errors import InputError

from ..numpy.cache import LayerKV as _ReferenceLayerKV, ordered_state
from .ops import ffi_lib

#: the dtype the kernels read and write keys and values in
DTYPES = ("float32",)


class CLayerKV:
    def __init__(self, structs, index: int, spec: kv.LayerSpec, capacity: int):
        if spec.dtype not in DTYPES:
            raise InputError(f"C backend: KV cache dtype {spec.dtype!r} is not supported (supported: "
                             f"{', '.join(DTYPES)})")
        self.spec = spec
        self.window = spec.window
        self._structs = structs              # keeps the C structs alive as long as any layer is used
        self.kv = structs + index            # st_kv * for the kernels
        self._alloc(spec.initial_slots(capacity), copy_from=None)
        self.kv.window = int(spec.window or 0)
        self.kv.length = 0

    def _alloc(self, cap: int, copy_from) -> None:
        ffi, _ = ffi_lib()
        shape = (cap, self.spec.n_kv, self.spec.head_dim)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        pos = np.full(cap, kv.EMPTY, np.int64)
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
        """Room for n_new more tokens (global layers grow; rings never need to)."""
        if self.window:
            return
        need = self.length + n_new
        if need > len(self.pos):
            self._alloc(kv.grown_slots(len(self.pos), need), copy_from=(self.k, self.v, self.pos))

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


class CKVCache:
    def __init__(self, config, capacity: int, dtype: str = "float32"):
        ffi, _ = ffi_lib()
        self.specs = kv.layer_specs(config, dtype)
        self.structs = ffi.new("st_kv[]", len(self.specs))   # contiguous: st_forward takes the array
        self.layers = [CLayerKV(self.structs, i, spec, capacity) for i, spec in enumerate(self.specs)]

    def check(self, config) -> None:
        """InputError unless this cache was made for `config`'s layers, heads and windows: the kernels
        index it with the config's sizes."""
        if [(s.n_kv, s.head_dim, s.window) for s in self.specs] != \
                [(s.n_kv, s.head_dim, s.window) for s in kv.layer_specs(config)]:
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
