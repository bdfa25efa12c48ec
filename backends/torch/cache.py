"""KV cache of the torch backend: preallocated on the device, keys and values in the storage type
load(kv_dtype=) chose (f16 by default; bf16 or f32 on request).

The policy is st_sdk.kv's: global layers hold `capacity` slots and grow to at least twice their size
when a sequence outgrows them; sliding-window layers are rings of `window` slots indexed by absolute
position % window. Slot bookkeeping (lengths, positions of the chunk) is host-side Python: the
positions come from the caller as numpy, so writing a step never reads the device.
"""
from __future__ import annotations

import numpy as np
import torch

from st_sdk import kv


class LayerKV:
    def __init__(self, spec: kv.LayerSpec, capacity: int, device: torch.device):
        self.spec = spec
        self.window = spec.window
        cap = spec.initial_slots(capacity)
        n_kv, head_dim, dtype = spec.n_kv, spec.head_dim, getattr(torch, spec.framework_dtype)
        # [n_kv, slots, hd]: the layout attention reads, so no transpose per step
        self.k = torch.zeros((n_kv, cap, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((n_kv, cap, head_dim), dtype=dtype, device=device)
        self.pos = torch.full((cap,), kv.EMPTY, dtype=torch.int64, device=device)
        self.length = 0   # tokens appended so far
        self.used = 0     # slots [0, used) may hold a token; the rest are still empty
        self.last = -1    # highest position appended
        self.monotone = True   # positions only ever increased: a single new query sees every key
        self.dense = True      # positions were exactly 0, 1, 2, ...: every used ring slot is in the window

    @property
    def slots(self) -> int:
        return self.pos.shape[0]

    def reserve(self, need: int) -> None:
        if self.window or need <= self.slots:
            return
        grow = kv.grown_slots(self.slots, need)
        n = self.slots
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], grow, old.shape[2]))
            new[:, :n] = old
            setattr(self, name, new)
        pos = self.pos.new_full((grow,), kv.EMPTY)
        pos[:n] = self.pos
        self.pos = pos

    def append(self, k: torch.Tensor, v: torch.Tensor, positions_t: torch.Tensor, positions) -> None:
        """k, v: [T, n_kv, hd] on the device; positions_t: int64 [T] absolute positions on the device,
        positions: the same on the host (bookkeeping reads those, never the device)."""
        T = positions_t.shape[0]
        first = int(positions[0])
        if T == 1:   # decode: no numpy calls, and ring slots written by host index
            top, increasing = first, first > self.last
        else:
            top = int(np.max(positions))
            increasing = first > self.last and bool(np.all(np.diff(positions) > 0))
        self.monotone = self.monotone and increasing
        self.dense = self.dense and increasing and first == self.length and top == first + T - 1
        self.last = max(self.last, top)
        if self.window and T == 1:
            slot = kv.ring_slot(top, self.window)
            self.k[:, slot] = k[0]
            self.v[:, slot] = v[0]
            self.pos[slot] = top
            self.used = min(self.window, max(self.used, top + 1))
        elif self.window:
            keep = kv.ring_keep(T, self.window)        # older rows of a long chunk fall out anyway
            pt = positions_t[keep:]
            slots = kv.ring_slot(pt, self.window)      # on the device: no host read
            self.k.index_copy_(1, slots, k[keep:].transpose(0, 1))
            self.v.index_copy_(1, slots, v[keep:].transpose(0, 1))
            self.pos.index_copy_(0, slots, pt)
            self.used = min(self.window, max(self.used, top + 1))   # slot = pos % window <= top
        else:
            self.reserve(self.length + T)
            self._write(self.length, k, v, positions_t)
            self.used = self.length + T
        self.length += T

    def _write(self, start: int, k, v, pt) -> None:
        n = k.shape[0]
        self.k[:, start:start + n] = k.transpose(0, 1)
        self.v[:, start:start + n] = v.transpose(0, 1)
        self.pos[start:start + n] = pt

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def can_truncate(self, n: int) -> bool:
        return n >= self.length or not self.window or self.length <= self.window

    def truncate(self, n: int) -> None:
        if n >= self.length:
            return
        self.pos[self.pos >= n] = -1
        self.length = n
        self.used = min(self.used, n)   # positions 0..n-1 sit in slots 0..n-1 (global, or a ring that never wrapped)
        self.last = n - 1


class KVCache(kv.LayeredCache):
    def __init__(self, config, capacity: int, dtype: str, device: torch.device):
        self.layers = [LayerKV(spec, capacity, device) for spec in kv.layer_specs(config, dtype)]

    # ---- prompt cache and saved conversations (st_sdk.generation.prompt_cache) ----------------------
    def state(self):
        out = []
        for layer in self.layers:
            keep = (layer.pos >= 0).nonzero().flatten()
            pos = layer.pos[keep]
            order = torch.argsort(pos)
            keep, pos = keep[order], pos[order]
            k = layer.k[:, keep].transpose(0, 1).float().cpu().numpy()
            v = layer.v[:, keep].transpose(0, 1).float().cpu().numpy()
            out.append((k, v, pos.cpu().numpy()))
        return out

    def restore(self, state, n: int) -> None:
        for layer, (k, v, pos) in zip(self.layers, state):
            if len(pos):
                dev, dt = layer.k.device, layer.k.dtype
                layer.append(torch.from_numpy(k).to(dev, dt), torch.from_numpy(v).to(dev, dt),
                             torch.from_numpy(pos).to(dev), pos)
            layer.length = n
