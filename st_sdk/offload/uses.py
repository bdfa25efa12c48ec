"""The expert cache's bookkeeping of uses (st_sdk.offload.cache.ExpertCache counts through these methods):
each expert's uses for lfru, aged, and per slot when its expert was last used, what lfru's victim is
chosen from. Held in arrays, so that C can count the uses of the layers it runs from resident experts
itself (CBackend.offloaded_layers, csrc `st_uses`) exactly as `count_used` does."""
from __future__ import annotations

import numpy as np

from .reads import Key, expert_ids

AGE_EVERY = 32          # lfru: the use counts are halved after 32 x slots uses
#: UseCounts._counts: uses counted, the last use's number (a slot's _seq), then what C counted since
#: `counted`: hits, hits on experts read ahead, agings
COUNTS = ("uses", "tick", "hits", "prefetch_hits", "aged")


class UseCounts:
    """The counting half of ExpertCache (which sets up `_new_uses` and `_new_slots` and provides `lru`,
    `held`, `stats`, `slots`, `policy`, `table`, `_victims` and `keep_counts`)."""

    def _new_uses(self, layers: int, width: int) -> None:
        # lfru: uses of every expert seen, aged, [layers, experts] (widened for an expert past the last); and
        # which experts were read ahead and not used since
        self.uses = np.zeros((layers, width))
        self._prefetched = np.zeros((layers, width), np.uint8)
        self._counts = np.zeros(len(COUNTS), np.int64)   # see COUNTS

    def _new_slots(self, slots: int) -> None:
        """Per slot, for lfru's victim: when its expert was last used (-1: empty), that expert's uses, its key."""
        self._seq = np.full(max(1, slots), -1, np.int64)
        self._slot_uses = np.zeros(max(1, slots))
        self._slot_layer = np.full(max(1, slots), -1, np.int32)
        self._slot_expert = np.full(max(1, slots), -1, np.int32)
        self._counts[1] = 0
        self._victims: list[tuple[int, int]] = []   # lfru: (slot, its _seq when chosen), next victim last

    def count_used(self, layer: int, experts) -> None:
        """`used` without settling: for picks told after the fact (CBackend.offloaded_layers, which may count
        them in C instead: `use_arrays`, then `counted`)."""
        keys = [(layer, e) for e in dict.fromkeys(expert_ids(experts))]
        self.held = set(keys)
        for key in keys:
            self._hit(key, self.lru[key])

    def use_arrays(self) -> dict | None:
        """What C updates to count the uses of a layer it ran from resident experts as `count_used` does
        (csrc st_uses), lfru only (None under lru, whose order is the LRU's): the use counts and read-ahead
        marks [layers, experts], each slot's last use, its expert's uses then and that expert's layer and
        index, `_counts` (C adds its hits there, not to `stats`: see `counted`) and the uses between agings."""
        if self.policy != "lfru" or self.table is None or self.uses.shape[1] < self.table.shape[1]:
            return None
        return {"uses": self.uses, "prefetched": self._prefetched, "seq": self._seq, "slot_uses": self._slot_uses,
                "slot_layer": self._slot_layer, "slot_expert": self._slot_expert, "counts": self._counts,
                "age_every": AGE_EVERY * self.slots}

    def counted(self) -> None:
        """After C counted uses (`use_arrays`): its hits moved into `stats`, and what an aging it did
        entails (the victims chosen before it dropped; the counts kept)."""
        c = self._counts
        self.stats.hits += int(c[2])
        self.stats.prefetch_hits += int(c[3])
        aged, c[2:] = int(c[4]), 0
        if aged:
            self._aged()

    def _hit(self, key: Key, slot: int) -> int:
        if self.policy == "lfru":
            self._count(key)
        self.lru.move_to_end(key)
        self._touch(key, slot)
        stats = self.stats
        stats.hits += 1
        if self._prefetched[key]:
            stats.prefetch_hits += 1
            self._prefetched[key] = 0
        return slot

    def _touch(self, key: Key, slot: int) -> None:
        """`key` became the most recent resident expert (in `slot`): the arrays lfru's victim reads."""
        self._counts[1] += 1
        self._seq[slot] = self._counts[1]
        self._slot_uses[slot] = self.uses[key]
        self._slot_layer[slot], self._slot_expert[slot] = key

    def _count(self, key: Key) -> None:
        self._widen(key[1])
        self.uses[key] += 1.0
        self._counts[0] += 1
        if self._counts[0] % (AGE_EVERY * self.slots) == 0:   # halved, those below 0.25 dropped (as csrc age_uses)
            uses, resident = self.uses, self._seq >= 0
            uses[uses < 0.25] = 0.0
            uses *= 0.5
            self._slot_uses[resident] = uses[self._slot_layer[resident], self._slot_expert[resident]]
            self._aged()

    def _aged(self) -> None:
        self._victims.clear()
        if self.keep_counts is not None:
            self.keep_counts()

    def _widen(self, e: int) -> None:
        """Room in `uses` and the read-ahead marks for expert e (a cache made without `experts`)."""
        if e >= self.uses.shape[1]:
            more = ((0, 0), (0, max(e + 1, 2 * self.uses.shape[1]) - self.uses.shape[1]))
            self.uses, self._prefetched = np.pad(self.uses, more), np.pad(self._prefetched, more)

    def use_counts(self, experts: int) -> np.ndarray:
        """lfru's use counts as float32 [layers, experts]."""
        counts = np.zeros((len(self.part_bytes), experts), np.float32)
        n = min(experts, self.uses.shape[1])
        counts[:, :n] = self.uses[:, :n]   # one copy: another thread may be counting
        return counts

    def _victim(self) -> Key | None:
        """The resident, unheld expert to evict under the policy."""
        if self.policy == "lru":
            return next((key for key in self.lru if key not in self.held), None)
        # over the slots' arrays (kept by _touch); several victims are chosen at once, each taken while untouched
        while self._victims:
            slot, seq = self._victims.pop()
            key = self._key_at(slot)
            if self._seq[slot] == seq and key in self.lru and key not in self.held:
                return key
        mask = self._seq >= 0
        for key in self.held:
            if key in self.lru:
                mask[self.lru[key]] = False
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return None
        # fewest uses first, the least recent of equals; up to 1/8 of the candidates at once
        order = idx[np.lexsort((self._seq[idx], self._slot_uses[idx]))][:max(1, min(self.victim_batch, idx.size // 8))]
        self._victims = [(int(slot), int(self._seq[slot])) for slot in order[::-1]]
        slot, _ = self._victims.pop()
        return self._key_at(slot)

    def _key_at(self, slot: int) -> Key:
        return int(self._slot_layer[slot]), int(self._slot_expert[slot])
