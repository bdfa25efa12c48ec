"""KV cache of the NumPy reference, following st_sdk.kv's policy: global layers grow, sliding-window
layers are rings of `window` rows indexed by position % window, so their memory stops growing.

Keys and values are stored as f32 (default: the exact oracle), f16, or q8_0 (ggml's rounding: blocks
of 32 values along head_dim, d = max|x| / 127 kept as f16, q = round(x / d)); `entries` reads them
back as float32. `stored` rounds new keys the same way, so a step's own keys are what the cache will
hold (as the C kernels stage them)."""
from __future__ import annotations

import numpy as np

from st_sdk import kv

#: storage types this cache keeps, the default first
DTYPES = ("f32", "f16", "q8_0")


def q8_0_dtype(hd: int) -> np.dtype:
    """One kv head's row as q8_0: the f16 scale of each block of 32, then the int8 values."""
    return np.dtype([("d", "<f2", (hd // 32,)), ("qs", "i1", (hd,))])


def q8_0_encode(x: np.ndarray) -> np.ndarray:
    """float32 [..., hd] -> q8_0 rows [...] (hd % 32 == 0)."""
    x = np.asarray(x, np.float32)
    hd = x.shape[-1]
    b = x.reshape(*x.shape[:-1], hd // 32, 32)
    d = np.abs(b).max(axis=-1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    out = np.empty(x.shape[:-1], q8_0_dtype(hd))
    out["qs"] = np.rint(b * inv[..., None]).astype(np.int8).reshape(x.shape)
    out["d"] = d.astype(np.float16)
    return out


def q8_0_decode(a: np.ndarray) -> np.ndarray:
    hd = a.dtype["qs"].shape[0]
    q = a["qs"].astype(np.float32).reshape(*a.shape, hd // 32, 32)
    return (q * a["d"].astype(np.float32)[..., None]).reshape(*a.shape, hd)


class LayerKV:
    def __init__(self, spec: kv.LayerSpec, capacity: int):
        if spec.dtype not in DTYPES:
            from st_sdk.errors import InputError

            raise InputError(f"kv_dtype={spec.dtype!r}: the NumPy cache stores one of {', '.join(DTYPES)}")
        self.spec = spec
        self.window = spec.window
        cap = spec.initial_slots(capacity)
        self.k, self.v = self._zeros(cap), self._zeros(cap)
        self.pos = np.full(cap, kv.EMPTY, np.int64)
        self.length = 0   # tokens appended so far

    def _zeros(self, n: int) -> np.ndarray:
        s = self.spec
        if s.dtype == "q8_0":
            return np.zeros((n, s.n_kv), q8_0_dtype(s.head_dim))
        return np.zeros((n, s.n_kv, s.head_dim), s.framework_dtype)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return q8_0_encode(x) if self.spec.dtype == "q8_0" else np.asarray(x).astype(self.spec.framework_dtype)

    def _decode(self, a: np.ndarray) -> np.ndarray:
        return q8_0_decode(a) if self.spec.dtype == "q8_0" else a.astype(np.float32, copy=False)

    def stored(self, x: np.ndarray) -> np.ndarray:
        """x [T, nKV, hd] as this cache will hold it, read back as float32."""
        return x if self.spec.dtype == "f32" else self._decode(self._encode(x))

    def entries(self):
        """(k, v, positions) of every stored token, unordered; k and v float32."""
        if self.window:
            valid = self.pos != kv.EMPTY
            return self._decode(self.k[valid]), self._decode(self.v[valid]), self.pos[valid]
        n = self.length
        return self._decode(self.k[:n]), self._decode(self.v[:n]), self.pos[:n]

    def append(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        k, v = self._encode(k), self._encode(v)
        if self.window:
            keep = slice(kv.ring_keep(len(positions), self.window), None)
            slots = kv.ring_slot(positions[keep], self.window)
            self.k[slots], self.v[slots], self.pos[slots] = k[keep], v[keep], positions[keep]
        else:
            need = self.length + len(positions)
            if need > len(self.pos):
                extra = kv.grown_slots(len(self.pos), need) - len(self.pos)
                self.k = np.concatenate([self.k, self._zeros(extra)])
                self.v = np.concatenate([self.v, self._zeros(extra)])
                self.pos = np.concatenate([self.pos, np.full(extra, kv.EMPTY, np.int64)])
            sl = slice(self.length, need)
            self.k[sl], self.v[sl], self.pos[sl] = k, v, positions
        self.length += len(positions)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    def can_truncate(self, n: int) -> bool:
        """Whether the entries of positions < n are all still here (a ring that wrapped lost some)."""
        return n >= self.length or not self.window or self.length <= self.window

    def truncate(self, n: int) -> None:
        """Forget positions >= n (check can_truncate first)."""
        self.pos[self.pos >= n] = -1
        self.length = min(self.length, n)


def ordered_state(layers) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(k, v, positions) of each layer's stored tokens in position order, float32/int64 on the host."""
    out = []
    for layer in layers:
        k, v, pos = layer.entries()
        order = np.argsort(pos, kind="stable")
        out.append((np.asarray(k, np.float32)[order], np.asarray(v, np.float32)[order], np.asarray(pos, np.int64)[order]))
    return out


class KVCache(kv.LayeredCache):
    def __init__(self, config, capacity: int, dtype: str = "f32"):
        self.layers = [LayerKV(spec, capacity) for spec in kv.layer_specs(config, dtype)]

    # ---- prompt cache and saved conversations (st_sdk.generation.prompt_cache) ----------------------
    def state(self):
        return ordered_state(self.layers)

    def restore(self, state, n: int) -> None:
        """Load what `state()` returned for a sequence of n tokens into this (empty) cache."""
        for layer, (k, v, pos) in zip(self.layers, state):
            if len(pos):
                layer.append(k, v, pos)
            layer.length = n
