"""Wire the expert cache into a model: experts become cache-backed tensors, and the router op starts
their reads before attention runs."""
from __future__ import annotations

import dataclasses
import mmap
import os

import numpy as np

from ..backend import Param, fallback_op
from ..registry import reference_backend
from ..weights.tensor import STORAGE_DTYPE, WeightTensor, storage_shape
from .budget import MemoryPlan, parse_size, plan_memory
from .cache import ExpertCache, Extent, expert_ids
from .reads import file_extent

PARTS = ("gate", "up", "down")


class OffloadedExperts:
    """Stands in for a stacked [E, ...] expert WeightTensor; `expert(e)` reads through the cache."""

    parts = None
    offloaded = True

    def __init__(self, stored: WeightTensor, layer: int, part: int, cache: ExpertCache):
        self.name, self.fmt, self.shape, self.source = stored.name, stored.fmt, stored.shape, stored.source
        self.layer, self.part, self.cache = layer, part, cache
        self._storage_shape = storage_shape(stored.fmt, stored.shape[1:])

    @property
    def layout(self):
        """The backend's layout its experts are converted to as they are read (Backend.expert_layout),
        None when the cache holds them as stored."""
        return self.cache.layouts[self.layer][self.part]

    @property
    def nbytes(self) -> int:
        return 0   # nothing resident: the cache's slots are counted once, by the cache

    def expert(self, e: int) -> WeightTensor:
        if self.layout is not None:
            raise TypeError(f"{self.name}: the cache holds these experts in a backend's own layout")
        return self._tensor(e, self.cache.get(self.layer, int(e), count=self.part == 0)[self.part])

    def stored_expert(self, e: int) -> WeightTensor:
        """Expert e as stored, read from the model file: not through the cache, whose slots may hold a
        backend's layout and whose statistics count the MoE's uses (st_sdk.routing.RoutingRecorder)."""
        ext = self.cache.locate(self.layer, int(e))[self.part]
        return self._tensor(e, np.frombuffer(os.pread(self.cache._fd(ext.path), ext.nbytes, ext.offset), np.uint8))

    def _tensor(self, e: int, raw: np.ndarray) -> WeightTensor:
        data = raw.view(STORAGE_DTYPE[self.fmt]).reshape(self._storage_shape)
        return WeightTensor(f"{self.name}[{e}]", self.fmt, self.shape[1:], data, self.source)

    def numpy(self):
        raise TypeError(f"{self.name}: offloaded experts are read one at a time; use .expert(e)")

    storage = numpy


class Dequantised:
    """An expert matrix held dequantised in the cache, for backends that compute in floats
    (Backend.expert_layout): [rows, cols] of `dtype` ('float32', 'bfloat16' or 'float16'), converted by
    the cache's I/O thread as the stored bytes arrive."""

    ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

    def __init__(self, fmt: str, rows: int, cols: int, dtype: str):
        if dtype not in self.ITEMSIZE:
            raise ValueError(f"Dequantised: dtype must be one of {', '.join(self.ITEMSIZE)}, got {dtype!r}")
        self.fmt, self.rows, self.cols, self.dtype = fmt, int(rows), int(cols), dtype
        self.nbytes = self.rows * self.cols * self.ITEMSIZE[dtype]

    def convert(self, src: np.ndarray, out: np.ndarray) -> np.ndarray:
        from ..weights.tensor import dequantize, f32_to_bf16

        stored = src.view(STORAGE_DTYPE[self.fmt]).reshape(storage_shape(self.fmt, (self.rows, self.cols)))
        x = dequantize(self.fmt, stored, (self.rows, self.cols))
        dst = self.array(out)
        if self.dtype == "bfloat16":
            dst[:] = f32_to_bf16(x)
        else:
            dst[:] = x
        return out

    def array(self, view: np.ndarray) -> np.ndarray:
        """A slot's bytes as the [rows, cols] matrix (bfloat16 as its uint16 bits)."""
        dt = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[self.dtype]
        return view[:self.nbytes].view(dt).reshape(self.rows, self.cols)


def _expert_extents(stacked: WeightTensor, e: int) -> Extent:
    part = stacked.expert(e)
    return file_extent(part.data, f"{stacked.source}: tensor '{part.name}'")


def process_baseline_bytes() -> int:
    """What the process already holds (interpreter, libraries): counted against the budget."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 200 * 2**20


#: what the plan sets aside for a step's activations until the backend says what it needs
#: (Backend.step_scratch_bytes; the op-by-op path holds [tokens, context] attention scores per head)
ACTIVATION_BYTES = 64 * 2**20


def headroom_bytes(budget: int) -> int:
    """Left for the code pages and page cache a process needs to run inside a hard limit: 10% of the
    budget, within [64 MiB, 256 MiB] (the slots are read with O_DIRECT, so a larger budget needs no
    more of it)."""
    return min(max(64 * 2**20, budget // 10), 256 * 2**20)


def row_read_bytes(arrays, context: int) -> tuple[int, int]:
    """For weights read a row at a time off the file map (Backend.row_read_weights): the bytes that stay
    out of memory until read (marked for random reads: st_sdk.weights.mapping.read_by_rows), and the
    pages counted for them instead, those `context` distinct rows touch (each row's pages, and one more
    where a row straddles a page boundary)."""
    from ..weights.mapping import read_by_rows

    unread = pages = 0
    for a in arrays:
        n = read_by_rows(a)
        if n:
            row = a.nbytes // a.shape[0] if a.ndim > 1 else a.nbytes
            unread += n
            pages += min(n, context * (-(-row // mmap.PAGESIZE) + 1) * mmap.PAGESIZE)
    return unread, pages


def runtime_limit(budget: int) -> int | None:
    """The resident size past which the cache gives slots back at run time: the budget less half the
    headroom the plan left (the rest is for the page cache the kernel counts too)."""
    return budget - headroom_bytes(budget) // 2


def memory_plan_for(cfg, params, max_memory, context: int | None = None, kv_dtype: str = "f16",
                    scratch_bytes: int | None = None) -> MemoryPlan:
    """The plan `st_sdk.load(..., max_memory=)` starts from for these weights, made without reading or
    allocating anything: the experts counted as stored (a backend that holds them in a layout of
    another size, or copies of weights of its own, refits the slots once it has prepared the weights),
    the scratch from this process's present size. InputError when the budget is below the minimum."""
    part_bytes = [[_expert_extents(getattr(lp, p).raw, 0).nbytes for p in PARTS] for lp in params.layers]
    return _plan(cfg, params, parse_size(max_memory), part_bytes, context, kv_dtype, scratch_bytes)


def _plan(cfg, params, budget: int, part_bytes: list[list[int]], context: int | None, kv_dtype: str,
          scratch_bytes: int | None) -> MemoryPlan:
    context = context or cfg.default_context
    expert_bytes = max(sum(parts) for parts in part_bytes)
    expert_arrays = {id(getattr(lp, p).raw) for lp in params.layers for p in PARTS}
    dense = sum(p.raw.nbytes for _, p in params.all() if id(p.raw) not in expert_arrays)
    headroom = activations = None
    if scratch_bytes is None:
        # activations and kernel scratch (until the backend says what a step takes), what the process
        # holds already (interpreter, libraries), and headroom for the code pages and page cache a process
        # needs to run inside a hard limit without thrashing (measured: a plan with none ran 3x slower in
        # a 1 GiB cgroup)
        activations, headroom = ACTIVATION_BYTES, headroom_bytes
        scratch_bytes = activations + process_baseline_bytes()
    plan = plan_memory(budget, dense, cfg.kv_cache_bytes(context, kv_dtype), expert_bytes,
                       cfg.num_hidden_layers * cfg.moe_num_primary_experts,
                       cfg.moe_num_active_primary_experts, scratch_bytes, headroom, activations)
    plan.smallest_expert_bytes = min(sum(parts) for parts in part_bytes)
    plan.context = context
    return plan


def setup_offload(cfg, params, max_memory, context: int | None = None, io_threads: int = 4,
                  scratch_bytes: int | None = None, kv_dtype: str = "f16", policy: str = "lfru"):
    """Params whose experts are cache-backed (the given params are left as they are), the cache and
    the plan (the KV cache counted as `kv_dtype` at `context` tokens; build_model refits it once the
    backend's storage type is known). policy: the cache's eviction policy (st_sdk.offload.cache)."""
    budget = parse_size(max_memory)
    locations = [[list(_expert_extents(getattr(lp, p).raw, e) for p in PARTS)
                  for e in range(cfg.moe_num_primary_experts)] for lp in params.layers]
    # each layer's own stored sizes (types can differ per layer); a slot fits the largest layer's expert
    part_bytes = [[ext.nbytes for ext in layer[0]] for layer in locations]
    plan = _plan(cfg, params, budget, part_bytes, context, kv_dtype, scratch_bytes)
    files = tuple(sorted({ext.path for layer in locations for expert in layer for ext in expert}))
    cache = ExpertCache(lambda layer, e: locations[layer][e], part_bytes, plan.slots, io_threads, files=files,
                        policy=policy, experts=cfg.moe_num_primary_experts)
    layers = [dataclasses.replace(lp, **{p: Param(OffloadedExperts(getattr(lp, p).raw, i, j, cache))
                                         for j, p in enumerate(PARTS)})
              for i, lp in enumerate(params.layers)]
    cache.minimum_slots = plan.minimum_slots
    cache.limit = runtime_limit(budget)
    return dataclasses.replace(params, layers=layers), cache, plan


class Lookahead:
    """Reads ahead across layers: a later layer's router applied to this layer's input (the residual
    stream changes little from one layer to the next) guesses its picks, and the guessed experts that
    are neither resident nor being read start reading now, so reads overlap with more than one layer's
    compute. Guesses are made for each of the next `depth` layers: one layer of compute is often
    shorter than the reads a layer misses, and reads queued further ahead keep the disk busy through a
    layer that misses many. A wrong guess costs a read and a slot, so in mode "auto" the reads start
    only while they pay, at each distance on its own (guesses further ahead are wrong more often):
    every guess is checked against its layer's real picks, and reading ahead at a distance is on while,
    over recent guesses at that distance (counts decayed by DECAY per layer), at least THRESHOLD of the
    guessed reads were needed. Guesses are made and checked while it is off too, so it turns on again
    when they improve, except that guesses further ahead wait for the nearer ones to be on (they are
    never better, and each costs a router call). Mode "always" reads every guess."""

    THRESHOLD = 0.5
    DECAY = 0.97
    WARMUP = 8.0   # guessed reads checked at a distance before "auto" first decides
    DEPTH = 3      # layers guessed ahead (docs/memory_budget.md, "Reading three layers ahead": 3 against 2 and 4)

    def __init__(self, cache: ExpertCache, mode: str = "auto", depth: int | None = None):
        self.cache, self.mode = cache, mode
        self.depth = max(1, int(depth or self.DEPTH))
        # per distance - 1: decayed counts of guessed reads that were needed, and of all
        self.needed, self.guessed = [0.0] * self.depth, [0.0] * self.depth
        self.guesses: dict[int, list[tuple[int, set]]] = {}   # layer -> [(distance, experts)] guessed for it

    @property
    def share_needed(self) -> float:
        """Of recent guessed reads at every distance, the share that was needed."""
        guessed = sum(self.guessed)
        return sum(self.needed) / guessed if guessed else float("nan")

    def share_needed_at(self, distance: int) -> float:
        g = self.guessed[distance - 1]
        return self.needed[distance - 1] / g if g else float("nan")

    def active_at(self, distance: int) -> bool:
        return self.mode == "always" or (self.guessed[distance - 1] >= self.WARMUP and
                                         self.share_needed_at(distance) >= self.THRESHOLD)

    @property
    def active(self) -> bool:
        """Whether reading ahead is on (at the next layer, where guesses are best)."""
        return self.active_at(1)

    def check(self, layer: int, picked) -> None:
        """The layer's real picks: score the guesses made for it."""
        guesses = self.guesses.pop(layer, ())
        if guesses:
            real = set(expert_ids(picked))
            for distance, experts in guesses:
                self.needed[distance - 1] = self.needed[distance - 1] * self.DECAY + len(experts & real)
                self.guessed[distance - 1] = self.guessed[distance - 1] * self.DECAY + len(experts)

    def ahead(self, layer: int, guessed, distance: int = 1) -> None:
        """Guessed picks of `layer`, `distance` layers ahead: remember those that would need a read, and
        start them if reading ahead is on at that distance."""
        lru, pending = self.cache.lru, self.cache.pending
        missing = {e for e in expert_ids(guessed)
                   if (layer, e) not in lru and (layer, e) not in pending}
        if missing:
            self.guesses.setdefault(layer, []).append((distance, missing))
            if self.active_at(distance):
                self.cache.prefetch_ahead(layer, sorted(missing))


class PrefetchingRoute:
    """The route op, followed by starting the reads of the experts it picked (before attention); at the
    first layer of each step, first the cache's run-time memory check (`ExpertCache.keep_within`).
    lookahead: also read ahead the experts later layers' routers pick from this layer's input,
    "always" or "auto" (while those guesses pay; see Lookahead), kept in `cache.lookahead`.
    route_many(x, routers, k, softmax) -> (weights, ids) [n, T, k], where the backend has it: the
    layer's router and the guesses it will make in one call (the guess at a distance just turned on by
    this layer's picks, in one more).

    A backend that routes a layer itself (CBackend.offloaded_layer, which runs the whole layer in one call
    when the cache holds what it needs) asks `routers(layer)` which routers to apply, then gives their
    picks to `picked` (reads to start) or to `used` (the layer ran from resident experts)."""

    def __init__(self, route, params, cache: ExpertCache, prefetch: bool = True, lookahead: str | None = None,
                 route_many=None):
        self.route, self.route_many, self.cache, self.prefetch = route, route_many, cache, prefetch
        self.layer_of = {id(lp.router): i for i, lp in enumerate(params.layers)}
        self.all_routers = [lp.router for lp in params.layers]
        self.ahead = cache.lookahead = Lookahead(cache, lookahead) if prefetch and lookahead else None

    def reach(self, layer: int) -> int:
        """How many layers ahead to guess from this one: the next, then each further one while the
        guesses a layer nearer are on (further ones are no better: not worth a router call while off)."""
        return min(self.reach_ahead(), len(self.all_routers) - 1 - layer)

    def reach_ahead(self) -> int:
        """`reach` from a layer with more than `depth` layers after it (0 without reading ahead)."""
        if self.ahead is None:
            return 0
        d = 1
        while d < self.ahead.depth and self.ahead.active_at(d):
            d += 1
        return d

    def routers(self, layer: int) -> list:
        """The routers a layer applies to its input: its own, then those of the layers it guesses for."""
        if layer == 0:
            self.cache.keep_within()
        if self.ahead is None:
            return [self.all_routers[layer]]
        return self.all_routers[layer:layer + 1 + self.reach(layer)]

    def __call__(self, x, router, k, softmax):
        layer = self.layer_of[id(router)]
        routers = self.routers(layer)
        if len(routers) > 1 and self.route_many is not None:
            ws, idss = self.route_many(x, routers, k, softmax)
            w, ids = ws[0], idss[0]
            picks = np.reshape(idss, (len(idss), -1)).tolist()   # each router's picks, as ints, at once
        else:
            w, ids = self.route(x, router, k, softmax)
            picks = [expert_ids(ids)]
        self.picked(layer, x, picks, k, softmax)
        return w, ids

    def picked(self, layer: int, x, picks: list, k: int, softmax: bool) -> None:
        """The picks of `routers(layer)` (lists of ints): start the reads the layer's own need, then
        those of the guesses while reading ahead pays, all entering the kernel together."""
        if self.prefetch:
            self._after(self.cache.prefetch, layer, x, picks, k, softmax)

    def used(self, layer: int, x, picks: list, k: int, softmax: bool) -> None:
        """The picks of `routers(layer)` when the layer ran from resident experts and no guess needed a
        read: the uses counted (ExpertCache.used), the guesses handled as `picked` handles them (a guess
        further ahead that this layer's picks turned on may still start reads)."""
        self._after(self.cache.used, layer, x, picks, k, softmax)

    def ran_whole(self, layer: int, own, counted: bool = False) -> None:
        """A layer that ran from resident experts, told after the fact with its own picks (CBackend.
        offloaded_layers, once C has gone on to later layers): its uses counted (ExpertCache.count_used)
        unless C counted them, and the guesses made for it scored. Its own guesses needed no read when it
        ran (else it would not have run whole), so none is made again here."""
        if not counted:
            self.cache.count_used(layer, own)
        if self.ahead is not None and layer in self.ahead.guesses:
            self.ahead.check(layer, own)

    def _after(self, own, layer, x, picks, k, softmax) -> None:
        cache, ahead = self.cache, self.ahead
        cache.hold_reads()   # the layer's reads enter the kernel together, at the end
        try:
            own(layer, picks[0])
            if ahead is not None:
                ahead.check(layer, picks[0])
                self._guesses(layer, x, picks, k, softmax)
        finally:
            cache.submit_reads()

    def _guesses(self, layer, x, picks, k, softmax) -> None:
        for distance in range(1, self.reach(layer) + 1):   # one more when this layer's picks turned it on
            guess = picks[distance] if distance < len(picks) else \
                expert_ids(self.route(x, self.all_routers[layer + distance], k, softmax)[1])
            self.ahead.ahead(layer + distance, guess, distance)


def offload_ops(ops, backend, params, cache: ExpertCache, prefetch: bool, lookahead: str | None = "auto",
                live_shares: list | None = None, kept_layouts: list | None = None):
    """The op table under a memory budget, the router prefetching experts. The MoE runs on the backend
    only if it reads experts through the cache (`supports_offload`), with the experts converted as they
    are read to the layouts it asks for (`expert_layouts`, given the layers' live shares that earlier
    runs kept and the layouts it chose from them before: st_sdk.offload.profile; the layouts it reports
    in `layer_layouts` are kept with them), and then in the backend's fused layer if it has one for the
    cache (`offloaded_layer`), else op by op; otherwise on the NumPy reference, as stored. Call before
    the cache is first used."""
    native = "moe" in ops.native and getattr(backend, "supports_offload", False)
    if native:
        shapes = [[(getattr(lp, p).raw.fmt, *(int(n) for n in getattr(lp, p).raw.shape[1:]), p) for p in PARTS]
                  for lp in params.layers]
        kept = {"kept_layouts": kept_layouts} if kept_layouts else {}
        cache.set_layouts(backend.expert_layouts(shapes, live_shares, **kept))
        chosen = getattr(backend, "layer_layouts", None) if live_shares else None
        cache.layouts_chosen = (backend.name, list(chosen)) if chosen else None
    moe = ops.moe if native else fallback_op("moe", reference_backend().moe, backend)
    many = getattr(backend, "route_many", None) if "route" in ops.native else None
    route = PrefetchingRoute(ops.route, params, cache, prefetch, lookahead, route_many=many)

    def fused_layer(cfg, i, p, h, ctx, layer_cache):   # the backend's own, around the cache
        return backend.offloaded_layer(cfg, i, p, h, ctx, layer_cache, route)

    def fused_layers(cfg, layers, h, ctx, cache):   # the same, every layer of a step
        return backend.offloaded_layers(cfg, layers, h, ctx, cache, route)

    layer = fused_layer if native and getattr(backend, "offloaded_layer", None) is not None else None
    layers = fused_layers if layer is not None and getattr(backend, "offloaded_layers", None) is not None \
        and os.environ.get("ST_OFFLOAD_LAYERS", "1") != "0" else None
    return dataclasses.replace(ops, forward=None, layer=layer, layers=layers, forward_batch=None, moe=moe, route=route,
                               fallbacks=sorted(set(ops.fallbacks) | ({"moe"} if moe is not ops.moe else set())))
