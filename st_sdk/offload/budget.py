"""Parse a memory budget and plan what fits in it, before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from ..sizes import fmt_bytes, parse_size  # noqa: F401  (parse_size is re-exported by st_sdk.offload)

@dataclass
class MemoryPlan:
    budget: int
    dense_bytes: int        # embeddings, attention, norms, routers, head: resident
    kv_bytes: int           # KV cache at the planned context
    scratch_bytes: int      # activations, dequantised rows, interpreter and library overhead
    expert_bytes: int       # one cache slot: the largest expert (gate + up + down) as stored
    slots: int              # experts the cache holds
    n_experts: int          # experts in the model (layers x experts per layer)
    minimum_slots: int = 2  # the layer being computed and the one being prefetched
    converted_bytes: int = 0  # a backend's converted copies beyond the mapped file (repacked weights)
    smallest_expert_bytes: int = 0  # the smallest layer's expert, when a file's types differ per layer
    context: int = 0        # tokens the KV cache is planned for
    expert_file: object = None  # the prepared expert file read from (st_sdk.offload.prepared), if any
    headroom: Callable[[int], int] | None = None  # the part of the scratch that grows with the budget
    row_read_bytes: int = 0  # of dense_bytes: weights read a row at a time off the file map (not resident)...
    row_pages_bytes: int = 0  # ...counted as the pages a context of distinct rows touches instead
    activation_bytes: int | None = None  # of scratch_bytes: a step's activations (None: not counted apart)

    def budget_for(self, slots: int) -> int:
        """The smallest budget that holds `slots` experts with everything else as planned."""
        return _budget_for(self.resident_dense_bytes + self.kv_bytes + self.scratch_bytes - self._headroom(self.budget),
                           slots * self.expert_bytes, self._headroom)

    def _headroom(self, budget: int) -> int:
        return self.headroom(budget) if self.headroom is not None else 0

    @property
    def resident_dense_bytes(self) -> int:
        """The dense weights as counted against the budget: those read by rows only as the rows read."""
        return self.dense_bytes - self.row_read_bytes + self.row_pages_bytes

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes

    def account(self, extra_bytes: int, kv_bytes: int | None = None, row_read: tuple[int, int] | None = None,
                activations: int | None = None) -> None:
        """Another resident copy appeared (a backend's repacked weights), the KV cache's size is known
        from the storage type the backend uses (kv_bytes), the backend reads some dense weights a row
        at a time off the file map (row_read: their bytes, and the pages counted for them instead), or
        it said what a step's activations take (activations, in place of the default reserve; a plan
        given its scratch whole keeps it): refit the expert cache into what is left."""
        if kv_bytes is not None:
            self.kv_bytes = int(kv_bytes)
        if row_read is not None:
            self.row_read_bytes, self.row_pages_bytes = (int(n) for n in row_read)
        if activations is not None and self.activation_bytes is not None:
            self.scratch_bytes += int(activations) - self.activation_bytes
            self.activation_bytes = int(activations)
        extra_bytes = max(int(extra_bytes), 0)
        if not extra_bytes and kv_bytes is None and row_read is None and activations is None:
            return
        rest = self.resident_dense_bytes + self.kv_bytes + self.scratch_bytes + extra_bytes
        slots = min(self.n_experts, (self.budget - rest) // self.expert_bytes)
        if slots < self.minimum_slots:
            least = _budget_for(rest - self._headroom(self.budget), self.minimum_slots * self.expert_bytes,
                                self._headroom)
            step = "" if self.activation_bytes is None else \
                f", a step's activations {fmt_bytes(self.activation_bytes)}"
            raise InputError(
                f"max_memory={fmt_bytes(self.budget)} is too small: the backend keeps {fmt_bytes(extra_bytes)} of "
                f"converted weights besides the file{step} and a KV cache of {fmt_bytes(self.kv_bytes)}, "
                f"leaving room for {max(slots, 0)} experts (at least {self.minimum_slots} needed); "
                f"the minimum budget is {fmt_bytes(least)} on this backend, or choose another backend")
        self.converted_bytes = extra_bytes
        self.slots = slots

    def describe(self) -> str:
        converted = f" + {fmt_bytes(self.converted_bytes)} converted" if self.converted_bytes else ""
        if self.row_read_bytes:
            converted = (f" (of which {fmt_bytes(self.row_read_bytes)} read a row at a time, counted as "
                         f"{fmt_bytes(self.row_pages_bytes)})") + converted
        mixed = "" if self.smallest_expert_bytes in (0, self.expert_bytes) else \
            f" (slots fit the largest layer's expert; the smallest is {fmt_bytes(self.smallest_expert_bytes)})"
        return (f"budget {fmt_bytes(self.budget)}: dense {fmt_bytes(self.dense_bytes)}{converted}, "
                f"KV cache {fmt_bytes(self.kv_bytes)}, scratch {fmt_bytes(self.scratch_bytes)}, "
                f"expert cache {self.slots} x {fmt_bytes(self.expert_bytes)} = {fmt_bytes(self.cache_bytes)} "
                f"({self.slots / self.n_experts:.0%} of {self.n_experts} experts){mixed}, "
                + (f"read from the prepared file {self.expert_file}" if self.expert_file else
                   "converted as they are read from the model file"))


def plan_memory(budget: int, dense_bytes: int, kv_bytes: int, expert_bytes: int, n_experts: int,
                active_per_layer: int, scratch_bytes: int, headroom: Callable[[int], int] | None = None,
                activation_bytes: int | None = None) -> MemoryPlan:
    """Fit the expert cache into what the budget leaves. The cache needs at least two layers' worth of
    active experts: the layer being computed and the one being prefetched. `headroom(budget)`: scratch
    that grows with the budget, added to `scratch_bytes`. activation_bytes: of `scratch_bytes`, a reserve
    for a step's activations that the backend's own figure replaces once it is bound (`account`); a
    budget too small only because of it gets the minimum of slots until then."""
    minimum_slots = 2 * active_per_layer
    plan = MemoryPlan(budget, dense_bytes, kv_bytes, scratch_bytes + (headroom(budget) if headroom else 0),
                      expert_bytes, 0, n_experts, minimum_slots, headroom=headroom, activation_bytes=activation_bytes)
    fixed = dense_bytes + kv_bytes + plan.scratch_bytes
    slots = min((budget - fixed) // expert_bytes if budget > fixed else 0, n_experts)
    if slots < minimum_slots and activation_bytes and \
            budget - fixed + activation_bytes >= minimum_slots * expert_bytes:
        slots = minimum_slots
    if slots < minimum_slots:
        raise InputError(
            f"max_memory={fmt_bytes(budget)} is too small for this model: the dense part needs "
            f"{fmt_bytes(dense_bytes)}, the KV cache {fmt_bytes(kv_bytes)}, scratch {fmt_bytes(plan.scratch_bytes)}, "
            f"and the expert cache at least {minimum_slots} x {fmt_bytes(expert_bytes)}; "
            f"the minimum budget is {fmt_bytes(plan.budget_for(minimum_slots))}")
    plan.slots = int(slots)
    return plan


def _budget_for(rest: int, cache_bytes: int, headroom: Callable[[int], int]) -> int:
    """The smallest budget b with b >= rest + cache_bytes + headroom(b), headroom growing with b (found
    by iterating to the fixed point)."""
    b = rest + cache_bytes
    for _ in range(8):
        b = rest + cache_bytes + headroom(b)
    return b
