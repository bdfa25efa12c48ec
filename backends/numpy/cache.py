"""KV cache of the NumPy reference, following st_sdk.kv's policy: global layers grow, sliding-window
layers are rings of `window` rows indexed by position % window, so their memory stops growing."""
from __future__ import annotations

import numpy as np

from st_sdk import kv


class LayerKV:
    def __init__(self, spec: kv.LayerSpec, capacity: int):
        self.spec = spec
        self.window = spec.window
        cap = spec.initial_slots(capacity)
        self.k = np.zeros((cap, spec.n_kv, spec.head_dim), spec.dtype)
        self.v = np.zeros((cap, spec.n_kv, spec.head_dim), spec.dtype)
        self.pos = np.full(cap, kv.EMPTY, np.int64)
        self.length = 0   # tokens appended so far

    def entries(self):
        """(k, v, positions) of every stored token, unordered."""
        if self.window:
            valid = self.pos != kv.EMPTY
            return self.k[valid], self.v[valid], self.pos[valid]
        n = self.length
        return self.k[:n], self.v[:n], self.pos[:n]

    def append(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        if self.window:
            keep = slice(kv.ring_keep(len(positions), self.window), None)
            slots = kv.ring_slot(positions[keep], self.window)
            self.k[slots], self.v[slots], self.pos[slots] = k[keep], v[keep], positions[keep]
        else:
            need = self.length + len(positions)
            if need > len(self.pos):
                extra = kv.grown_slots(len(self.pos), need) - len(self.pos)
                self.k = np.concatenate([self.k, np.zeros((extra, *self.k.shape[1:]), self.k.dtype)])
                self.v = np.concatenate([self.v, np.zeros((extra, *self.v.shape[1:]), self.v.dtype)])
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


class KVCache:
    def __init__(self, config, capacity: int, dtype: str = "float32"):
        self.layers = [LayerKV(spec, capacity) for spec in kv.layer_specs(config, dtype)]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    # ---- prompt cache and saved conversations (st_sdk.generation.prompt_cache) ----------------------
    def truncate(self, n: int) -> bool:
        """Keep only positions < n; False (and nothing changed) when a sliding-window ring already
        dropped some of them."""
        if not all(layer.can_truncate(n) for layer in self.layers):
            return False
        for layer in self.layers:
            layer.truncate(n)
        return True

    def state(self):
        return ordered_state(self.layers)

    def restore(self, state, n: int) -> None:
        """Load what `state()` returned for a sequence of n tokens into this (empty) cache."""
        for layer, (k, v, pos) in zip(self.layers, state):
            if len(pos):
                layer.append(k, v, pos)
            layer.length = n
