"""KV cache of the JAX backend: per layer preallocated (keys, values, positions) arrays of static shape.

The jitted step receives them as a pytree and donates it, so writes are in place. The policy is
st_sdk.kv's: global layers hold `capacity` slots indexed by position and grow to at least twice their
size; sliding-window layers are rings of `window` slots indexed by position % window. Here sizes come
in power-of-two buckets, each one more compilation, never one per token, and a ring smaller than its
window (a short sequence) grows the same way until it reaches the window.
"""
from __future__ import annotations

import jax.numpy as jnp

from st_sdk import kv

MIN_CAPACITY = 4


def bucket(n: int) -> int:
    return max(MIN_CAPACITY, 1 << (max(int(n), 1) - 1).bit_length())


class LayerCache:
    """One layer's view of the cache, what `attention` receives."""

    def __init__(self, owner: "JaxCache", index: int):
        self.owner, self.index = owner, index
        self.spec = owner.specs[index]
        self.window = self.spec.window

    @property
    def arrays(self):
        return self.owner.arrays[self.index]

    @arrays.setter
    def arrays(self, kv):
        self.owner.arrays[self.index] = kv

    def ensure(self, need: int) -> None:
        self.owner.ensure(need, layers=[self.index])

    @property
    def capacity(self) -> int:
        return int(self.arrays[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


class JaxCache:
    def __init__(self, config, capacity: int, dtype: str = "float32"):
        self.specs = kv.layer_specs(config, dtype)
        self.windows = [spec.window for spec in self.specs]
        self.dtype = getattr(jnp, dtype)
        cap = bucket(capacity)
        self.arrays = [self._alloc(self._fit(i, cap)) for i in range(len(self.specs))]
        self.layers = [LayerCache(self, i) for i in range(len(self.specs))]

    def _fit(self, i: int, cap: int) -> int:
        w = self.windows[i]
        return min(w, cap) if w else cap

    def _alloc(self, n: int):
        shape = (n, self.specs[0].n_kv, self.specs[0].head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.full((n,), kv.EMPTY, jnp.int32)

    def ensure(self, need: int, layers=None) -> None:
        """Room for positions < need (grown to the next bucket, at least doubling)."""
        for i in range(len(self.specs)) if layers is None else layers:
            K, V, P = self.arrays[i]
            have = K.shape[0]
            want = self._fit(i, bucket(kv.grown_slots(have, need))) if need > have else have
            if want > have:
                extra = self._alloc(want - have)
                self.arrays[i] = (jnp.concatenate([K, extra[0]]), jnp.concatenate([V, extra[1]]),
                                  jnp.concatenate([P, extra[2]]))

    # ---- prompt cache and saved conversations (st_sdk.generation.prompt_cache) ----------------------
    def truncate(self, n: int) -> bool:
        """Keep positions < n; False when a ring already dropped some of them."""
        import numpy as np

        for i, w in enumerate(self.windows):
            P = np.asarray(self.arrays[i][2])
            top = int(P.max()) + 1 if P.size else 0
            if w and n < top and top > w:
                return False
        for i in range(len(self.windows)):
            K, V, P = self.arrays[i]
            self.arrays[i] = (K, V, jnp.where(P >= n, -1, P))
        return True

    def state(self):
        import numpy as np

        out = []
        for K, V, P in self.arrays:
            P = np.asarray(P).astype(np.int64)
            keep = np.flatnonzero(P >= 0)
            keep = keep[np.argsort(P[keep], kind="stable")]
            out.append((np.asarray(K, np.float32)[keep], np.asarray(V, np.float32)[keep], P[keep]))
        return out

    def restore(self, state, n: int) -> None:
        self.ensure(n)
        for i, (k, v, pos) in enumerate(state):
            if not len(pos):
                continue
            K, V, P = self.arrays[i]
            slots = pos % self.windows[i] if self.windows[i] else pos
            self.arrays[i] = (K.at[slots].set(jnp.asarray(k, K.dtype)), V.at[slots].set(jnp.asarray(v, V.dtype)),
                              P.at[slots].set(jnp.asarray(pos, P.dtype)))

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(int(kv[0].shape[0]) for kv in self.arrays)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for kv in self.arrays for a in kv)
