"""The C backend: cffi kernels (csrc/) over ggml block layouts, chosen per instruction set at run time.

A decode step is one call into C (`forward`): embedding, every layer and the head run as one job on
a thread pool created once per thread count. The individual ops are provided too, so the conformance
kit can check each one against the reference.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np

from st_sdk import kv
from st_sdk.backend import EXPERT_ROLES, MATRIX_ROLES, NORM_ROLES, Backend, Param, is_offloaded
from st_sdk.errors import BackendError, InputError
from st_sdk.hardware import probe, resolve_threads
from st_sdk.offload.pages import Arena
from st_sdk.sizes import bytes_per_token
from st_sdk.weights.mapping import in_file_map, release_map
from st_sdk.weights.tensor import QUANT_SIZES

from . import ops
from .cache import KV_DTYPES, CKVCache, CLayerKV
from .layouts import by_live_shares, choose_layouts, describe_layouts, live_threshold as threshold_for
from .ops import (CExperts, CMat, activations, as_experts, as_mat, check, f32_vector, ffi_lib, int64_vector, ptr,
                  sparse_counters, stage_clocks)

_pools: dict[tuple[int, int | None], object] = {}
_pools_lock = threading.Lock()
# pause instructions a pool's workers spin for the next job before sleeping, in memory-budget mode while
# I/O threads read the experts (the C default, 20000, elsewhere). Between a budget layer's jobs the
# compute thread runs Python and waits for expert reads, and the I/O threads need a core: a worker
# spinning through that took one. Measured on the 4b-a0.6b Q4_0 in a 1 GiB cgroup (skewed routing,
# 2 threads): 20.6-21.5 tok/s against 19.6-20.1 with the default; the default kept for resident
# decoding (16.2-17.3 ms a token against 17.9-20.0 ms with 2000). Where io_uring reads (no I/O thread
# wants the core) the default is kept too: 2000 gave 0.89-0.99x of it on the skewed 21b-a3b in 8 GiB, and
# moved within the rounds' spread on the 4b-a0.6b in 1 GiB (paired rounds). docs/memory_budget.md.
BUDGET_IDLE_SPIN = 2000


#: the most tokens a budget step runs with its layers in one C call (`offloaded_layers`; it keeps every
#: layer's routing of the step): a longer prompt's chunk goes layer by layer, where the Python between
#: the calls costs little beside its compute
LAYERS_AT_ONCE_TOKENS = 8


def budget_idle_spin(cache) -> int | None:
    """The idle spin of a budget layer's pool for this expert cache (None: the C default): less only
    while I/O threads read (see BUDGET_IDLE_SPIN; benchmarks/idle_spin.py compares spins)."""
    return BUDGET_IDLE_SPIN if cache.reads_on_threads else None


def cpu_flags(hardware=None) -> frozenset[str]:
    """CPU feature flags, normalised by st_sdk.hardware (e.g. "avx512_vnni", "neon")."""
    return (hardware or probe()).features


def best_variant(lib) -> str:
    for name in ("avx512", "avx2", "neon", "generic"):
        if lib.st_cpu_supports(ops.VARIANTS[name]):
            return name
    return "generic"


_forced_variant: str | None = None   # set by use_variant(); wins over ST_C_VARIANT


def set_variant(name: str | None = None) -> str:
    """Select the kernel variant process-wide: `name`, else use_variant()'s, else ST_C_VARIANT, else
    the best this CPU runs. Returns the one selected; BackendError if unknown or unsupported here."""
    _, lib = ffi_lib()
    name = (name or _forced_variant or os.environ.get("ST_C_VARIANT", "") or best_variant(lib)).strip().lower()
    if name not in ops.VARIANTS:
        raise BackendError(f"ST_C_VARIANT={name!r} is not a kernel variant; choose one of {', '.join(ops.VARIANTS)}")
    if lib.st_set_variant(ops.VARIANTS[name]) != 0:
        raise BackendError(f"kernel variant {name!r} is not supported by this CPU "
                           f"(supported here: {', '.join(v for v, c in ops.VARIANTS.items() if lib.st_cpu_supports(c))})")
    return name


def use_variant(name: str | None) -> str:
    """Force a variant for this and every later load in this process (None: back to automatic)."""
    global _forced_variant
    _forced_variant = None
    chosen = set_variant(name)
    _forced_variant = chosen if name else None
    return chosen


def get_pool(n: int, idle_spin: int | None = None):
    """The process's pool of n threads whose workers spin `idle_spin` pauses for the next job before
    sleeping (None: the C default), created on first use (called several times a layer)."""
    key = (n, idle_spin)
    pool = _pools.get(key)
    if pool is not None:
        return pool
    ffi, lib = ffi_lib()
    with _pools_lock:
        if key not in _pools:
            p = lib.st_pool_new(n)
            if p == ffi.NULL:
                raise BackendError(f"could not create a pool of {n} threads")
            if idle_spin is not None:
                lib.st_pool_set_idle_spin(p, idle_spin)
            _pools[key] = p
        return _pools[key]


def _forget_pools() -> None:
    """In a forked child: the parent's pool structs came along, none of their threads."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _up_kept_in_file(gate: str, up: str) -> bool:
    """Whether an up in layout `up` must keep the file's layout beside a gate in layout `gate`: the fused
    expert kernel reads a repacked up only beside a repacked gate (csrc: gate_up_ok)."""
    return up == "repacked" and gate != "repacked"


def _picks(ids, weights, T: int, E: int):
    """A step's routing checked: ids int64 [T, k] in [0, E) and weights float32 [T, k], contiguous, and
    the distinct experts picked, in order of first pick."""
    ids, weights = np.asarray(ids), np.asarray(weights)
    if ids.ndim != 2 or ids.shape[0] != T or weights.shape != ids.shape or ids.dtype.kind not in "iu":
        raise InputError(f"moe: ids and weights must both be [T={T}, k], ids integers, got {ids.dtype}"
                         f"{list(ids.shape)} and {list(weights.shape)}")
    picked = list(dict.fromkeys(ids.ravel().tolist()))
    if picked and (min(picked) < 0 or max(picked) >= E):
        raise InputError(f"moe ids: values must lie in [0, {E}), got min {min(picked)} max {max(picked)}")
    return (np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(weights, np.float32), picked)


class _LayersPlan(NamedTuple):
    structs: list      # each layer's one-layer st_model
    addresses: list    # each layer's _slot_addresses
    models: object     # const st_model *[]
    mats: list         # the routers' CMat (kept alive)
    routers: object    # const st_mat *[]
    base: int
    stride: int
    offsets: object    # int64_t[L * 3]


def _dims(cfg) -> dict:
    """st_model's dimensions for this config."""
    return {"hidden": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_kv": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "n_experts": cfg.moe_num_primary_experts,
            "top_k": cfg.moe_num_active_primary_experts, "ffn": cfg.moe_ffn_hidden_size, "vocab": cfg.vocab_size}


def _moe_inputs(x, ids, weights, H: int, E: int):
    """x as float32 [T, H], ids int64 [T, k] in [0, E) and weights float32 [T, k], all contiguous."""
    xs = activations(x, H, "moe x")
    ids, weights, _ = _picks(ids, weights, xs.shape[0], E)
    return xs, ids, weights


#: a fused step reading fewer weight bytes than this (per token, times its tokens) runs on one thread:
#: its barriers would cost more than a second thread saves, and on a busy machine a descheduled worker
#: stalls every barrier (measured on 2 cores with the load average at 17: the tiny preset decoded at
#: ~750 tok/s on one thread, ~50 on two). Only when the thread count was not asked for.
SMALL_STEP_BYTES = 1 << 20
#: ST_C_SPARSE_LAYOUT values ("auto": chosen layer by layer at load, backends/c/layouts.py)
SPARSE_LAYOUTS = ("auto", "off", "up", "up+down")


class CBackend(Backend):
    name = "c"
    version = "0.1"
    #: types the kernels run as stored (from the memory map, or repacked 8 rows at a time)
    formats = tuple(ops.FMT_CODE)
    #: rarer GGUF types (IQ1/IQ2/IQ3, TQ, MXFP4, NVFP4): dequantised at load and re-stored as q8_0 (f16 for
    #: rows that are not whole blocks of 32); describe()["converted"] gives the bytes
    converts = tuple(f for f in QUANT_SIZES if f not in ops.FMT_CODE)
    #: moe reads experts through st_sdk.offload's cache under a memory budget (see _offloaded_moe)
    supports_offload = True
    #: KV cache storage types (f16 by default; q8_0 needs head_dim % 32 == 0)
    kv_dtypes = tuple(KV_DTYPES)

    def __init__(self, n_threads: int | None = None, dtype: str | None = None):
        super().__init__(n_threads, dtype)
        self.variant: str | None = None
        self.sparse = os.environ.get("ST_C_SPARSE", "1") != "0"
        # layouts that let a dead neuron cost no bytes: "up" (row-split up), "up+down" (and a neuron-major
        # down), "off" (repacked: faster when half the neurons are live, as on random weights), or "auto"
        # (the default: "up+down" in the layers whose share of live neurons, measured at load, is low,
        # "off" in the others; under a memory budget the same by the live shares earlier runs kept, else
        # "off"). docs/c_backend.md, "Sparse ReGLU"
        self.sparse_layout = os.environ.get("ST_C_SPARSE_LAYOUT", "auto").strip() or "auto"
        self.pending: set[int] = set()   # ids of up/down CExperts left in the file's layout until prepare_model
        self.layer_layouts: list[str] | None = None   # "auto": each layer's layout, chosen at load
        self.load_live_shares: list[float | None] | None = None   # "auto": each layer's live share at load
        self.live_thresholds: list[float] | None = None   # "auto": each layer's threshold
        self._offloaded = False   # a model's experts are read through a memory budget's cache
        # Q4_0/Q8_0 matrices repacked 8 rows at a time for the SIMD kernels: faster, costs a copy
        self.repack = os.environ.get("ST_C_REPACK", "1") != "0"
        self._idle_spin: int | None = None   # BUDGET_IDLE_SPIN once a budget layer has run
        self.copied_bytes = 0
        self.repacked_bytes = 0
        self.converted: dict[str, int] = {}   # "iq2_xs -> q8_0": bytes of the converted copies
        self.released_map_bytes = 0   # resident pages of repacked GGUF tensors dropped from this process
        self.arena = Arena()   # the repacked copies, on huge pages where the kernel grants them
        self._layer_structs: dict = {}
        self._slot_cache: dict = {}   # see _slot_addresses
        self._plans: dict = {}        # see _layers_plan
        self._route_structs: dict = {}   # see _routes
        self._step_positions = None   # see _layer_inputs
        self.threads = resolve_threads(n_threads)
        self._auto_threads = n_threads is None and not os.environ.get("ST_NUM_THREADS", "").strip()
        self._step_bytes: int | None = None   # st_sdk.sizes.bytes_per_token of the prepared model

    # ---- control plane -------------------------------------------------------------------------
    def setup(self) -> None:
        """The compiled kernels load, and the kernel variant is chosen (BackendError says why not)."""
        ffi_lib()
        if self.sparse_layout not in SPARSE_LAYOUTS:
            raise BackendError(f"ST_C_SPARSE_LAYOUT={self.sparse_layout!r}: expected one of "
                               f"{', '.join(SPARSE_LAYOUTS)}")
        self.variant = set_variant()
        if self.sparse_layout == "auto":
            threshold_for(self.variant)   # a bad ST_C_SPARSE_LIVE fails here, before any weight is read

    def score(self, hardware, fmt: str) -> float:
        flags = cpu_flags(hardware)
        simd = 2.0 if {"avx512f", "avx512_vnni"} <= flags else \
            1.5 if "avx2" in flags else 1.2 if "neon" in flags else 1.0
        # native integer kernels beat dequantise-then-BLAS
        base = 40.0 if fmt in ops.FMT_CODE and fmt not in ("f32", "f16", "bf16") else 20.0
        return base * simd

    def describe(self):
        d = {"device": "cpu", "compute_dtype": "float32 (q8 activations for quantised weights)",
             "variant": self.variant or os.environ.get("ST_C_VARIANT") or "unset", "threads": self.threads,
             "sparse_reglu": self.sparse, "sparse_layout": self._layout_summary(),
             "copied_weight_bytes": self.copied_bytes,
             "repacked_weight_bytes": self.repacked_bytes, "released_map_bytes": self.released_map_bytes,
             "huge_page_weight_bytes": self.arena.nbytes if self.arena.huge else 0,
             # resident beyond the mapped file: what a memory budget must also hold
             "extra_resident_bytes": self.copied_bytes + self.repacked_bytes + sum(self.converted.values())
             - self.released_map_bytes}
        if self.converted:
            d["converted"] = ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in self.converted.items())
        try:
            _, lib = ffi_lib()
            d["variants_supported"] = [v for v, c in ops.VARIANTS.items() if lib.st_cpu_supports(c)]
        except BackendError:
            pass
        return d

    def sparsity(self, reset: bool = False):
        """The fused expert stage's counters (csrc st_sparse_stats), shared by every model this process
        runs on the C backend; per-op moe calls (memory-budget mode) are not counted."""
        st = sparse_counters()
        if reset:
            ffi_lib()[1].st_sparse_stats_reset()
        used = st[:, 1] > 0
        if not used.any():
            return None
        tokens = int(st[used, 4].max())
        layers = st[:int(np.nonzero(used)[0].max()) + 1]
        return {"live_fraction": float(st[used, 0].sum() / st[used, 1].sum()),
                "layer_live_fraction": [float(a / b) if b else None for a, b in zip(layers[:, 0], layers[:, 1])],
                "tokens": tokens, "expert_bytes_per_token": float(st[used, 2].sum() / tokens),
                "down_bytes_per_token": float(st[used, 5].sum() / tokens),
                "dense_expert_bytes_per_token": float(st[used, 3].sum() / tokens)}

    def stage_seconds(self, reset: bool = False) -> dict[str, float]:
        """Wall seconds the fused passes have spent in each stage of a layer (csrc st_stage_seconds:
        "qkv_router", "attention", "gate_up", "down", "head", ...), the barriers that wait for the other
        threads included, so they add up to the passes' time; shared by every model this process runs
        on the C backend, since the module loaded or the last reset."""
        ffi, lib = ffi_lib()
        clocks = stage_clocks()
        if reset:
            lib.st_stage_seconds_reset()
        return {ffi.string(lib.st_stage_name(i)).decode(): float(t) for i, t in enumerate(clocks)}

    def wait_seconds(self) -> float | None:
        """Seconds the pool's threads have spent waiting for one another, summed over the threads (csrc
        st_wait_seconds): at the barriers between stages, and the calling thread at the end of each C
        call until the others finish; shared by every model this process runs on the C backend, and
        reset with `stage_seconds(reset=True)`. A thread the host takes away from the process (an
        interrupt, a hypervisor's steal) makes the others wait (docs/memory_budget.md, "Threads
        waiting for one another"). None from a build of the kernels that does not count it (an older one
        given by ST_C_KERNELS_PATH)."""
        lib = ffi_lib()[1]
        return float(lib.st_wait_seconds()) if hasattr(lib, "st_wait_seconds") else None

    def _lib(self):
        ffi, lib = ffi_lib()
        return ffi, lib, get_pool(self.threads, self._idle_spin)

    def prepare(self, param: Param, role: str):
        raw = param.raw
        if role in NORM_ROLES:
            return np.require(raw.numpy(), np.float32, ("C", "A"))   # a copy when the map is misaligned
        if raw.fmt not in ops.FMT_CODE:
            raw = self._convert(raw)
        rp = self._repacking() and role != "embed"   # the embedding is read by rows: keep the file's
        if role in EXPERT_ROLES:
            if raw is param.raw and self._choose_at_load(raw, role):
                v = CExperts(raw)   # the file's layout (no copy) until prepare_model measures live shares
                self.pending.add(id(v))
            else:
                v = CExperts(raw, **self._expert_layouts(role), arena=self.arena)
        elif role in MATRIX_ROLES:
            v = CMat(raw, repack_rows=rp, arena=self.arena)
        else:
            return raw
        return self._count(v)

    def _count(self, v, replacing=None):
        """`v` (a CMat or CExperts) counted in the bytes describe() reports, less the copy made for the
        weight it replaces (a matrix `choose_layouts` gives its layout after prepare)."""
        if replacing is not None:
            self.copied_bytes -= replacing.copied
        self.copied_bytes += v.copied
        self.repacked_bytes += v.repacked
        self.released_map_bytes += v.released
        return v

    def _convert(self, raw):
        """A type the kernels do not run, dequantised (gguf-py) and re-stored as q8_0, or f16 when its
        rows are not whole blocks of 32."""
        from st_sdk.weights.tensor import WeightTensor, quantize

        if raw.fmt not in self.converts:
            raise InputError(f"weight '{raw.name}': the C backend cannot run {raw.fmt!r}")
        target = "q8_0" if raw.shape[-1] % 32 == 0 else "f16"
        out = WeightTensor(raw.name, target, tuple(raw.shape), quantize(target, raw.numpy()), raw.source)
        key = f"{raw.fmt} -> {target}"
        self.converted[key] = self.converted.get(key, 0) + out.nbytes
        return out

    def _expert_layouts(self, role: str, layout: str | None = None) -> dict:
        """The layouts an expert matrix of `role` may take under `layout` (default: ST_C_SPARSE_LAYOUT's;
        "auto" is "off" until a layer's is chosen), in CExperts' order of preference: sparse ReGLU's
        next to a repacked gate (the SIMD variants), where the type and shape have them (row-split up:
        q4_0, q8_0; neuron-major down: those and q4_k, q6_k; hidden % 64 == 0); the repacked layout
        otherwise, which skips up rows only for 8 dead neurons in a row."""
        layout = layout or self.sparse_layout
        rp = self._repacking()
        sparse = rp and self.sparse and layout in ("up", "up+down")
        return {"repack_rows": rp, "row_split": sparse and role == "up",
                "neuron_major": sparse and role == "down" and layout == "up+down"}

    def _choose_at_load(self, raw, role: str) -> bool:
        """Under "auto": whether this up or down matrix has a sparse layout other than its repacked one,
        so that its layout waits for the live shares measured at load (backends/c/layouts.py)."""
        if self.sparse_layout != "auto" or role not in ("up", "down") or len(raw.shape) != 3:
            return False
        _, rows, cols = (int(n) for n in raw.shape)
        sparse, dense = (ops.layout(raw.fmt, rows, cols, **self._expert_layouts(role, lay)).name
                         for lay in ("up+down", "off"))
        return sparse != dense

    def _layout_summary(self) -> str:
        if not self.sparse:
            return "off"
        if self.layer_layouts is not None:
            kept = " (by the live shares kept from earlier runs)" if self._offloaded else ""
            return describe_layouts(self.layer_layouts, self.live_thresholds) + kept
        if self.sparse_layout == "auto" and self._offloaded:
            return "off (auto, under a memory budget: no live shares kept from earlier runs)"
        return self.sparse_layout

    def expert_layout(self, fmt: str, rows: int, cols: int, role: str, layout: str | None = None):
        """Experts read into a memory budget's cache take the layout loaded experts get (repacked, or
        sparse ReGLU's; `layout` as in `_expert_layouts`), converted by the cache's I/O threads as they
        arrive (Backend.expert_layout)."""
        if fmt not in ops.FMT_CODE:
            return None
        lay = ops.layout(fmt, rows, cols, **self._expert_layouts(role, layout))
        return None if lay.fn is None else lay

    def expert_layouts(self, shapes, live_shares=None, kept_layouts=None):
        """Under "auto", each layer's up and down laid out by the live shares earlier runs on the same
        files kept (sparse ReGLU's layouts below the threshold, as a loaded model's are chosen from its
        prefill at load; a layer keeps the layout kept_layouts gives it while its share is near the
        threshold: backends/c/layouts.py); without kept shares, repacked (Backend.expert_layouts)."""
        if self.sparse_layout != "auto" or not live_shares or not (self.sparse and self._repacking()):
            return self._up_beside_gates(super().expert_layouts(shapes, live_shares))
        chosen, thresholds = by_live_shares(self.variant, [[fmt for fmt, _, _, role in parts if role in ("up", "down")]
                                                           for parts in shapes], live_shares, kept_layouts)
        out = [[self.expert_layout(fmt, rows, cols, role, layout) for fmt, rows, cols, role in parts]
               for parts, layout in zip(shapes, chosen)]
        self.layer_layouts, self.load_live_shares, self.live_thresholds = chosen, list(live_shares), thresholds
        return self._up_beside_gates(out)

    @staticmethod
    def _up_beside_gates(layouts):
        """`_up_beside_gate` for the layouts of a budget's cache: [gate, up, down] per layer."""
        for parts in layouts:
            gate, up = parts[0], parts[1]
            if up is not None and _up_kept_in_file(gate.name if gate is not None else "file", up.name):
                parts[1] = None
        return layouts

    def live_counter(self, n_layers: int):
        """Under a memory budget, where no prefill at load measures them: a callable that gives each
        layer's share of live expert neurons over the steps run since this call (None for a layer that
        ran none; the process's counters, so other C models' steps in it count too), which the expert
        use counts keep for the next load's layouts (st_sdk.offload.profile)."""
        start = ops.sparse_counters()[:n_layers].copy()

        def seen() -> list[float | None]:
            now = ops.sparse_counters()[:n_layers]
            d = now - start[:len(now)]
            return [float(live / total) if total > 0 else None for live, total in zip(d[:, 0], d[:, 1])]

        return seen

    def _repacking(self) -> bool:
        """Repack only for the SIMD variants (measured faster); generic C reads the file's layout."""
        return self.repack and self.variant in ("avx2", "avx512")

    def prepare_model(self, params, config) -> None:
        embed = as_mat(params.embed)
        if params.head is params.embed and self._repacking() and ops.can_repack(embed.fmt, embed.rows):
            # tied: the embedding stays as stored for row lookups; the head gets its own repacked copy,
            # run by the fused step and by the layer-by-layer one of a memory budget alike
            # (the table's map pages this drops are not counted as released: the table is read by rows
            # from then on, which a memory budget counts as the rows read, row_read_weights)
            head = CMat(embed.tensor, repack_rows=True, arena=self.arena)
            self.repacked_bytes += head.repacked
            params.head = Param(params.embed.raw, head)
        if any(is_offloaded(lp.gate) for lp in params.layers):
            self._offloaded = True
            self._hold_mapped(params)
        self._up_beside_gate(params)
        params.extra["c_model"] = self._model_struct(params, config)
        if self.pending:   # "auto": each layer's up and down layout, from its live share measured now
            choose_layouts(self, params, config)
            self._up_beside_gate(params)
            params.extra["c_model"] = self._model_struct(params, config)
        self._step_bytes = bytes_per_token(params, config)

    def _up_beside_gate(self, params) -> None:
        """The fused expert kernel reads gate and up repacked together, or up on its own beside any gate
        (csrc: gate_up_ok): an up repacked beside a gate that has no repacked layout (a file that stores
        them in different types, a gate in IQ4_NL beside an up in Q4_0, say) goes back to the file's
        layout."""
        for lp in params.layers:
            gate, up = lp.gate.value, lp.up.value
            if isinstance(gate, CExperts) and isinstance(up, CExperts) and _up_kept_in_file(gate.layout, up.layout):
                raw = lp.up.raw if lp.up.raw.fmt in ops.FMT_CODE else self._convert(lp.up.raw)
                lp.up = Param(lp.up.raw, self._count(CExperts(raw), replacing=up))

    def _hold_mapped(self, params) -> None:
        """Under a memory budget, the dense weights still read from the file map (those not repacked:
        the f32 routers and norms; every matrix on the generic variant) are copied into anonymous memory
        and their map pages dropped: at the budget's hard limit the kernel makes room for any allocation
        by reclaiming file pages, and a weight that every token reads, refaulted from disk a page at a
        time, stalls the step (measured: 4b-a0.6b in 1 GiB at 4 instead of 24 tok/s). The budget counts
        them either way. The embedding, read by rows, stays in the map (row_read_weights)."""
        rows = self.row_read_weights(params)
        mats = [getattr(lp, f) for lp in params.layers for f in ("wq", "wk", "wv", "wo", "router")] + [params.head]
        for p in mats:
            m = p.value
            if isinstance(m, CMat) and not any(np.may_share_memory(m.data, r) for r in rows):
                released = m.released
                self.copied_bytes += m.hold(self.arena)
                self.released_map_bytes += m.released - released
        for p in [params.norm] + [getattr(lp, f) for lp in params.layers for f in ("attn_norm", "ffn_norm")]:
            v = p.value
            if isinstance(v, np.ndarray) and in_file_map(v):
                p.value = np.array(v)
                self.copied_bytes += v.nbytes
                self.released_map_bytes += release_map(v)

    def step_scratch_bytes(self, cfg, tokens, context):
        """Backend.step_scratch_bytes: what a fused pass allocates for one sequence of `tokens` tokens
        (csrc st_step_scratch_bytes, on this backend's threads), the routers' outputs of a budget layer
        (its own router and up to three guesses, route_many), and the step's arrays here: the hidden
        states in, copied and out, the embedded rows, the last position's logits."""
        ffi, lib = ffi_lib()
        T, H, E = int(tokens), cfg.hidden_size, cfg.moe_num_primary_experts
        k = cfg.moe_num_active_primary_experts
        fused = int(lib.st_step_scratch_bytes(ffi.new("st_model *", _dims(cfg)), T, int(context), self.threads))
        if fused < 0:
            raise InputError(f"step_scratch_bytes: tokens={tokens}, context={context} (positive tokens, context >= 0)")
        return fused + 4 * T * (E * 4 + k * 12) + 4 * T * H * 4 + cfg.vocab_size * 4

    def row_read_weights(self, params):
        """The embedding table when it is read from the file map by rows only (Backend.row_read_weights):
        not copied, and the head reads its own copy."""
        embed, head = as_mat(params.embed), as_mat(params.head)
        return [] if np.may_share_memory(embed.data, head.data) else [embed.data]

    def _step_pool(self, tokens: int):
        """The pool a fused step of `tokens` tokens runs on (see SMALL_STEP_BYTES)."""
        if self._auto_threads and self.threads > 1 and self._step_bytes is not None \
                and self._step_bytes * tokens < SMALL_STEP_BYTES:
            return get_pool(1, self._idle_spin)
        return get_pool(self.threads, self._idle_spin)

    def _model_struct(self, params, cfg):
        return self._struct(cfg, list(enumerate(params.layers)), params)

    def _struct(self, cfg, layer_list, params=None):
        """st_model over `layer_list` [(layer index, LayerParams)], with the embedding, final norm and
        head when `params` is given; (struct, keep-alive list, cfg)."""
        ffi, _ = ffi_lib()
        H, E = cfg.hidden_size, cfg.moe_num_primary_experts
        keep = []
        layers = ffi.new("st_layer[]", len(layer_list))
        for j, (i, lp) in enumerate(layer_list):
            L = layers[j]
            for f in ("wq", "wk", "wv", "wo", "router"):
                m = as_mat(getattr(lp, f))
                keep.append(m)
                setattr(L, f, m.struct[0])
            for f in ("gate", "up", "down"):
                if is_offloaded(getattr(lp, f)):   # read through the expert cache: see offloaded_layer
                    lay = self._cached_layout(getattr(lp, f).raw)
                    ptrs = ffi.new("void *[]", E)   # filled with a step's picked experts' slots
                    keep.append(ptrs)
                    setattr(L, f, {"experts": ptrs, "n_experts": E, "rows": lay.rows, "cols": lay.cols,
                                   "row_bytes": lay.row_bytes, "fmt": lay.code})
                    continue
                x = as_experts(getattr(lp, f))
                keep.append(x)
                setattr(L, f, x.struct[0])
            an, fn = f32_vector(lp.attn_norm, H), f32_vector(lp.ffn_norm, H)
            keep += [an, fn]
            L.attn_norm, L.ffn_norm = ptr(ffi, "float *", an), ptr(ffi, "float *", fn)
            L.use_rope = int(cfg.layer_uses_rope(i))
            L.window = int(cfg.layer_window(i) or 0)
        fields = {**_dims(cfg), "n_layers": len(layer_list), "eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
                  "softmax": int(cfg.moe_primary_router_apply_softmax), "sparse": int(self.sparse), "layers": layers,
                  "first_layer": layer_list[0][0] if layer_list else 0}
        if params is not None:
            embed, head, norm = as_mat(params.embed), as_mat(params.head), f32_vector(params.norm, H)
            keep += [embed, head, norm]
            fields.update(embed=embed.struct[0], head=head.struct[0], norm=ptr(ffi, "float *", norm))
        keep.append(layers)
        return (ffi.new("st_model *", fields), keep, cfg)

    # ---- fused ops -----------------------------------------------------------------------------
    def _layer_inputs(self, cfg, i, layer_params, h, ctx, layer_cache):
        """What a one-layer C call takes: the layer's st_model (built once per params and config), a copy
        of h to update in place [T, H], the positions, with room for T more in the layer's cache."""
        if not isinstance(layer_cache, CLayerKV):
            raise InputError("C backend layer needs a layer of a cache made by its own new_cache()")
        struct = self._layer_struct(cfg, i, layer_params)
        layer_cache.spec.check(cfg.num_key_value_heads, cfg.head_dim, cfg.layer_window(i), f"layer {i}")
        out = np.array(activations(h, cfg.hidden_size, f"layer {i} h"), copy=True)
        # a step's layers share its positions array: checked at the first layer (the C calls check for
        # negative ones too), remembered only where it is the caller's own array (not a converted copy)
        pos = ctx.positions
        if pos is not self._step_positions or pos.shape[0] != out.shape[0]:
            pos = int64_vector(pos, out.shape[0], "positions", 0)
            self._step_positions = pos if pos is ctx.positions else None
        layer_cache.reserve(out.shape[0])
        return struct, out, pos

    def _layer_struct(self, cfg, i, layer_params):
        """Layer i's one-layer st_model, built once per layer params and config."""
        key = (id(layer_params), i)
        hit = self._layer_structs.get(key)
        if hit is None or hit[0] is not layer_params or (hit[1][2] is not cfg and hit[1][2] != cfg):
            hit = self._layer_structs[key] = (layer_params, self._struct(cfg, [(i, layer_params)]))
        return hit[1][0]

    def layer(self, cfg, i, layer_params, h, ctx, layer_cache):
        """One whole decoder layer in one C call (h [T, H] in, h [T, H] out)."""
        ffi, lib, pool = self._lib()
        struct, out, pos = self._layer_inputs(cfg, i, layer_params, h, ctx, layer_cache)
        check(lib.st_layer_forward(pool, struct, 0, layer_cache.kv, ptr(ffi, "float *", out),
                                   ptr(ffi, "int64_t *", pos), out.shape[0]), f"layer {i}")
        return out, layer_cache

    def offloaded_layer(self, cfg, i, layer_params, h, ctx, layer_cache, route):
        """One layer under a memory budget, fused around the expert cache (Backend.offloaded_layer). The
        router picks first, with the guesses of the layers it reads ahead for (`route`: an
        st_sdk.offload.experts.PrefetchingRoute). When the cache holds every expert the layer picked and
        none of the guesses needs a read, the whole layer runs in that same C call, straight from the
        cache's slots (`_cached_layer`). Otherwise the reads start, attention runs in one C call while they
        arrive, then the ffn norm and the picked experts in a second, straight from the slots in the layout
        loaded experts get (`_finish_layer`). A step that picks more experts than the cache holds at once
        runs its experts group by group (`_offloaded_moe`)."""
        lp = layer_params
        cache = lp.gate.raw.cache
        self._idle_spin = budget_idle_spin(cache)   # every later op of this model too
        struct, out, pos = self._layer_inputs(cfg, i, lp, h, ctx, layer_cache)
        ffi, _ = ffi_lib()
        hp, pp = ptr(ffi, "float *", out), ptr(ffi, "int64_t *", pos)
        addresses = self._slot_addresses(struct, lp, i)
        k, softmax = cfg.moe_num_active_primary_experts, cfg.moe_primary_router_apply_softmax
        if getattr(route, "route_many", None) is not None and cache.table is not None:   # the routing is this backend's
            routed = self._cached_layer(struct, cache, lp.gate.raw.layer, route, out, hp, pp, layer_cache, k, softmax,
                                        addresses, i)
            if routed is None:
                return out, layer_cache
            weights, ids = routed
        else:
            weights, ids = route(out, lp.router, k, softmax)
        self._finish_layer(cfg, i, lp, struct, layer_cache, out, hp, pp, addresses, weights, ids)
        return out, layer_cache

    def _finish_layer(self, cfg, i, lp, struct, layer_cache, out, hp, pp, addresses, weights, ids):
        """The rest of a budget layer routed by (weights, ids) [T, k] whose reads have started: attention,
        then the picked experts from their slots (waiting for their reads), or group by group when more
        are picked than the cache holds at once."""
        ffi, lib, pool = self._lib()
        cache, (gate, up, down) = lp.gate.raw.cache, (lp.gate.raw, lp.up.raw, lp.down.raw)
        T = out.shape[0]
        ids, weights, picked = _picks(ids, weights, T, cfg.moe_num_primary_experts)
        check(lib.st_layer_part(pool, struct, 0, layer_cache.kv, hp, pp, T, 1, ffi.NULL, ffi.NULL), f"layer {i}")
        if len(picked) > cache.slots - 1:   # more than fit at once: group by group
            m = self.rms_norm(out, lp.ffn_norm, cfg.rms_norm_eps)
            out += self._offloaded_moe(m, gate, up, down, ids, weights, None)
            return
        pointers, base, stride, offsets = addresses[:4]
        at = np.array(picked, np.intp)
        slots = base + np.array(cache.slots_of(gate.layer, picked), np.uintp) * stride
        for experts, off in zip(pointers, offsets):   # the struct's pointers of the picked experts: their slots
            experts[at] = slots + off
        try:
            check(lib.st_layer_part(pool, struct, 0, layer_cache.kv, hp, pp, T, 2, ptr(ffi, "int64_t *", ids),
                                    ptr(ffi, "float *", weights)), f"layer {i}")
        finally:   # a slot may hold another expert by the next step
            for experts in pointers:
                experts[at] = 0

    def _cached_layer(self, struct, cache, layer: int, route, out, hp, pp, layer_cache, k: int, softmax: bool,
                      addresses, i: int):
        """`offloaded_layer`'s first call (st_layer_cached): the routers `route` asks for applied to `out`,
        and the whole layer run on it when the cache's table (ExpertCache.table) shows every pick resident
        and no guess absent; then the uses are counted (`route.used`) and None returned. Otherwise
        `_after_routing`."""
        ffi, lib, pool = self._lib()
        T = out.shape[0]
        structs, n, _ = self._router_structs(route.routers(layer), k)
        w = np.empty((n, T, k), np.float32)
        ids = np.empty((n, T, k), np.int64)
        done = ffi.new("int32_t *")
        rest = self._cached_args(cache, layer, addresses, w, ids, done)
        check(lib.st_layer_cached(pool, struct, 0, layer_cache.kv, hp, pp, T, structs, n, int(bool(softmax)), *rest),
              f"layer {i}")
        if done[0]:
            route.used(layer, out, ids.reshape(n, -1).tolist(), k, softmax)
            return None
        return self._after_routing(struct, cache, layer, route, out, hp, pp, layer_cache, k, softmax, w, ids, rest, i)

    def _cached_args(self, cache, layer: int, addresses, w, ids, done) -> tuple:
        """st_layer_cached's arguments after `softmax`: the layer's rows of the cache's table, its slots'
        base, stride and part offsets, the routing's arrays and the flag it sets."""
        ffi, _ = ffi_lib()
        _, base, stride, _, offsets = addresses
        return (ffi.cast("int32_t *", cache.table[layer:].ctypes.data), len(cache.buffer), ffi.cast("uint8_t *", base),
                stride, offsets, ptr(ffi, "float *", w), ptr(ffi, "int64_t *", ids), done)

    def _after_routing(self, struct, cache, layer: int, route, out, hp, pp, layer_cache, k: int, softmax: bool,
                       w, ids, rest, i: int):
        """A budget layer routed into (w, ids) [n, T, k] (its own router, then its guesses) that a read
        holds back: the reads start (`route.picked`); then, if every pick of the layer's own is resident
        (only guesses were read), the layer runs whole in a second call with that routing, its uses are
        counted (`ExpertCache.used`) and None is returned; else the layer's own (weights, ids) [T, k]."""
        ffi, lib, pool = self._lib()
        n, T = ids.shape[0], out.shape[0]
        picks = ids.reshape(n, -1).tolist()
        route.picked(layer, out, picks, k, softmax)
        if n > 1:   # only guesses' reads, maybe: the same routing again, whole if the own picks are resident
            check(lib.st_layer_cached(pool, struct, 0, layer_cache.kv, hp, pp, T, ffi.NULL, 0, int(bool(softmax)),
                                      *rest), f"layer {i}")
            if rest[-1][0]:
                cache.used(layer, picks[0])
                return None
        return w[0], ids[0]

    def offloaded_layers(self, cfg, layers, h, ctx, cache, route):
        """Every layer of a step under a memory budget, in one C call where it can (st_layers_cached;
        Backend.offloaded_layers): each layer routes as `offloaded_layer`'s first call does and runs whole
        in C while the cache holds its picks and its guesses need no read, their uses counted there on the
        cache's arrays (`_uses_struct`); they are told to `route.ran_whole`, in order, when C next calls
        back and at the end (their uses counted then, where C did not). Any other layer calls
        back here to start its reads (`route.picked`); if they were only its guesses' and its own picks are
        resident, C then runs it whole as above (ST_LAYER_RUN), else it finishes here as `offloaded_layer`
        does (attention, then the experts as their reads arrive). A step whose routing the backend does
        not run itself goes layer by layer."""
        experts = layers[0].gate.raw.cache if layers else None
        if not layers or getattr(route, "route_many", None) is None or experts.table is None \
                or not isinstance(cache, CKVCache) or np.shape(h)[0] > LAYERS_AT_ONCE_TOKENS:
            for i, lp in enumerate(layers):
                h, cache.layers[i] = self.offloaded_layer(cfg, i, lp, h, ctx, cache.layers[i], route)
            return h
        ffi, lib, pool = self._lib()
        self._idle_spin = budget_idle_spin(experts)
        plan = self._layers_plan(cfg, layers, experts, cache)
        out = np.array(activations(h, cfg.hidden_size, "h"), copy=True)
        T, k, softmax, L = out.shape[0], cfg.moe_num_active_primary_experts, cfg.moe_primary_router_apply_softmax, len(layers)
        pos = int64_vector(ctx.positions, T, "positions", 0)
        cache.reserve(T)
        most = 1 + route.reach_ahead()
        w = np.empty((L, most, T, k), np.float32)
        ids = np.empty((L, most, T, k), np.int64)
        ran = np.zeros(L, np.int32)
        reach = np.array([most - 1], np.int32)
        hp, pp = ptr(ffi, "float *", out), ptr(ffi, "int64_t *", pos)
        counted, failed, uses = [0], [], self._uses_struct(experts)
        in_c = uses != ffi.NULL

        def count(upto: int) -> None:   # the layers that ran whole in C, up to `upto`, told to `route`
            for j in range(counted[0], upto):
                if ran[j] > 0:
                    route.ran_whole(j, ids[j, 0].ravel().tolist(), in_c)
            if in_c:
                experts.counted()
            counted[0] = max(counted[0], upto)

        def back(_, i):
            try:
                count(i)
                counted[0] = i + 1
                n = -int(ran[i])
                own = ids[i, 0].ravel()
                route.picked(i, out, ids[i, :n].reshape(n, -1).tolist(), k, softmax)
                rc = 0
                if n > 1 and bool((experts.table[i, own] >= 0).all()):   # only guesses were read: C runs it
                    if not in_c:   # counted here, and finished reads settled
                        experts.used(i, own.tolist())
                    elif experts.pending:   # C counts; finished reads settled, as `used` settles them
                        experts._settle()
                    rc = lib.ST_LAYER_RUN
                else:
                    self._finish_layer(cfg, i, layers[i], plan.structs[i], cache.layers[i], out, hp, pp,
                                       plan.addresses[i], w[i, 0], ids[i, 0])
                reach[0] = min(route.reach_ahead(), most - 1)
                return rc
            except BaseException as e:   # raised again below, once C has returned
                failed.append(e)
                return 1

        route.routers(0)   # the step's run-time memory check, as a first layer's routing makes it
        callback = ffi.callback("int32_t(void *, int64_t)", back)
        rc = lib.st_layers_cached(pool, plan.models, plan.routers, L, cache.structs, hp, pp, T, int(bool(softmax)),
                                  ffi.cast("int32_t *", reach.ctypes.data), most,
                                  ffi.cast("int32_t *", experts.table.ctypes.data), len(experts.buffer),
                                  ffi.cast("uint8_t *", plan.base), plan.stride, plan.offsets, ptr(ffi, "float *", w),
                                  ptr(ffi, "int64_t *", ids), ffi.cast("int32_t *", ran.ctypes.data), uses, callback,
                                  ffi.NULL)
        if failed:
            raise failed[0]
        check(rc, "budget layers")
        count(L)
        if ran[L - 1] > 0:   # the last layer's experts held, as a layer run by `route` leaves them
            experts.held = {(L - 1, e) for e in ids[L - 1, 0].ravel().tolist()}
        if experts.pending:
            experts._settle()
        return out

    @staticmethod
    def _uses_struct(experts):
        """The cache's bookkeeping of uses as csrc's st_uses (ExpertCache.use_arrays), for C to count the
        uses of the layers it runs whole; NULL where the cache's policy keeps its own order (lru)."""
        ffi, _ = ffi_lib()
        a = experts.use_arrays()
        if a is None or os.environ.get("ST_OFFLOAD_COUNT_IN_C", "1") == "0":
            return ffi.NULL
        u = ffi.new("st_uses *")
        u.uses, u.prefetched = ffi.cast("double *", a["uses"].ctypes.data), ffi.cast("uint8_t *", a["prefetched"].ctypes.data)
        u.width, u.age_every = a["uses"].shape[1], a["age_every"]
        u.seq, u.slot_uses = ffi.cast("int64_t *", a["seq"].ctypes.data), ffi.cast("double *", a["slot_uses"].ctypes.data)
        u.slot_layer = ffi.cast("int32_t *", a["slot_layer"].ctypes.data)
        u.slot_expert = ffi.cast("int32_t *", a["slot_expert"].ctypes.data)
        u.counts = ffi.cast("int64_t *", a["counts"].ctypes.data)
        return u

    def _layers_plan(self, cfg, layers, experts, cache):
        """What `offloaded_layers` hands C for a step, built once per layer list, config and cache buffer:
        the layers' one-layer structs and slot addresses (as `offloaded_layer` uses them), their routers,
        and the slots' base, stride and part offsets [L, 3] as C arrays; InputError unless the KV cache
        `cache` fits the config."""
        cache.check(cfg)
        hit = self._plans.get(id(layers))
        if hit is not None and hit[0] is experts.buffer and hit[2] is layers and hit[3] is cfg:
            return hit[1]
        ffi, _ = ffi_lib()
        structs, addresses, routers = [], [], []
        for i, lp in enumerate(layers):
            structs.append(self._layer_struct(cfg, i, lp))
            addresses.append(self._slot_addresses(structs[-1], lp, i))
            routers.append(as_mat(lp.router))
        offsets = ffi.new("int64_t[]", [int(a[4][j]) for a in addresses for j in range(3)])
        plan = _LayersPlan(structs, addresses, ffi.new("const st_model *[]", structs), routers,
                           ffi.new("const st_mat *[]", [r.struct for r in routers]), addresses[0][1], addresses[0][2],
                           offsets)
        self._plans[id(layers)] = (experts.buffer, plan, layers, cfg)
        return plan

    def _slot_addresses(self, struct, lp, i: int):
        """For `offloaded_layer`, worked out once per layer and cache buffer: the layer struct's gate, up
        and down expert-pointer arrays (NumPy views of them), the cache buffer's address (the buffer kept
        alive here) and slot stride, where each part lies in a slot, and those offsets as a C array;
        InputError if the cache's part sizes are not the layouts'."""
        parts = (lp.gate.raw, lp.up.raw, lp.down.raw)
        cache, layer = lp.gate.raw.cache, lp.gate.raw.layer
        key = (id(struct), layer)
        hit = self._slot_cache.get(key)
        if hit is not None and hit[0] is cache.buffer:
            return hit[1]
        ffi, _ = ffi_lib()
        offsets = cache.offsets[layer]
        for part, a, b in zip(parts, offsets[:-1], offsets[1:]):
            if b - a != self._cached_layout(part).nbytes:
                raise InputError(f"layer {i}: expert slot holds {b - a} bytes for {part.name}, expected "
                                 f"{self._cached_layout(part).nbytes}")
        L = struct.layers[0]
        size = int(L.gate.n_experts) * ffi.sizeof("void *")
        # the gate, up and down expert-pointer arrays as NumPy views (written a step's picks at a time)
        pointers = [np.frombuffer(ffi.buffer(p.experts, size), np.uintp) for p in (L.gate, L.up, L.down)]
        addr = (pointers, int(cache.buffer.ctypes.data), int(cache.buffer.strides[0]),
                [np.uintp(o) for o in offsets[:-1]], ffi.new("int64_t[]", [int(o) for o in offsets[:-1]]))
        self._slot_cache[key] = (cache.buffer, addr, struct)
        return addr

    def _cached_layout(self, part):
        """The layout an offloaded expert matrix has in the cache: `expert_layout`'s, else the file's."""
        if part.fmt not in ops.FMT_CODE:
            raise BackendError(f"memory-budget mode on the C backend reads experts in types it runs; "
                               f"'{part.name}' is {part.fmt}, which it converts only when loaded whole "
                               f"(load without max_memory, or re-quantise the file)")
        _, rows, cols = (int(n) for n in part.shape)
        return part.layout or ops.layout(part.fmt, rows, cols)

    # ---- the fused step --------------------------------------------------------------------------
    def forward(self, cfg, params, ids, positions, cache, last_only=False):
        ffi, lib, pool = self._lib()
        state = params.extra.get("c_model")
        if state is None or (state[2] is not cfg and state[2] != cfg):
            state = params.extra["c_model"] = self._model_struct(params, cfg)
        if not isinstance(cache, CKVCache):
            raise InputError("C backend forward needs a cache made by its own new_cache()")
        cache.check(cfg)
        ids = int64_vector(ids, np.size(ids), "ids", 0, cfg.vocab_size)
        T = ids.shape[0]
        if T == 0:
            raise InputError("ids: empty sequence")
        positions = int64_vector(positions, T, "positions", 0)
        cache.reserve(T)
        logits = np.empty((1 if last_only else T, cfg.vocab_size), np.float32)
        pool = self._step_pool(T)
        check(lib.st_forward(pool, state[0], cache.structs, ptr(ffi, "int64_t *", ids),
                             ptr(ffi, "int64_t *", positions), T, int(bool(last_only)), ptr(ffi, "float *", logits)),
              "forward")
        return logits

    def forward_batch(self, cfg, params, ids, positions, caches, seg):
        """One step over several sequences in one C call (st_forward_batch): logits [B, vocab]."""
        ffi, lib, pool = self._lib()
        state = params.extra.get("c_model")
        if state is None or (state[2] is not cfg and state[2] != cfg):
            state = params.extra["c_model"] = self._model_struct(params, cfg)
        seg = np.asarray(seg)
        B = len(seg) - 1
        if seg.ndim != 1 or B < 1 or not np.issubdtype(seg.dtype, np.integer) or seg[0] != 0 \
                or np.any(np.diff(seg) <= 0) or len(caches) != B:
            raise InputError(f"forward_batch: seg must be increasing row offsets from 0, one segment per cache "
                             f"({len(caches)} caches), got {seg.tolist()}")
        if len({id(c) for c in caches}) != B:
            raise InputError("forward_batch: a cache appears twice in one step")
        T = int(seg[-1])
        ids = int64_vector(ids, T, "ids", 0, cfg.vocab_size)
        positions = int64_vector(positions, T, "positions", 0)
        seg = np.ascontiguousarray(seg, np.int64)
        for cache, a, b in zip(caches, seg[:-1], seg[1:]):
            if not isinstance(cache, CKVCache):
                raise InputError("C backend forward_batch needs caches made by its own new_cache()")
            cache.check(cfg)
            cache.reserve(int(b - a))
        kvs = ffi.new("st_kv *[]", [c.structs for c in caches])
        logits = np.empty((B, cfg.vocab_size), np.float32)
        check(lib.st_forward_batch(pool, state[0], kvs, B, ptr(ffi, "int64_t *", seg), ptr(ffi, "int64_t *", ids),
                                   ptr(ffi, "int64_t *", positions), ptr(ffi, "float *", logits)), "forward_batch")
        return logits

    # ---- individual ops --------------------------------------------------------------------------
    def embed(self, table: Param, ids):
        ffi, lib, _ = self._lib()
        m = as_mat(table)
        ids = int64_vector(ids, np.size(ids), "ids", 0, m.rows)
        out = np.empty((len(ids), m.cols), np.float32)
        check(lib.st_get_rows(m.struct, ptr(ffi, "int64_t *", ids), len(ids), ptr(ffi, "float *", out)), "embed")
        return out

    def rms_norm(self, x, weight: Param, eps: float):
        ffi, lib, pool = self._lib()
        w = f32_vector(weight)
        xs = activations(x, w.shape[0], "rms_norm x")
        out = np.empty_like(xs)
        check(lib.st_rms_norm(pool, ptr(ffi, "float *", xs), ptr(ffi, "float *", w), xs.shape[0], w.shape[0],
                              float(eps), ptr(ffi, "float *", out)), "rms_norm")
        return out.reshape(np.shape(x))

    def linear(self, x, weight: Param):
        ffi, lib, pool = self._lib()
        m = as_mat(weight)
        xs = activations(x, m.cols, f"linear x (weight '{m.name}')")
        y = np.empty((xs.shape[0], m.rows), np.float32)
        check(lib.st_linear(pool, m.struct, ptr(ffi, "float *", xs), xs.shape[0], ptr(ffi, "float *", y)),
              f"linear '{m.name}'")
        return y.reshape(*np.shape(x)[:-1], m.rows)

    def rope(self, q, k, ctx):
        return self._rope(q, ctx.positions, ctx.theta), self._rope(k, ctx.positions, ctx.theta)

    def _rope(self, x, positions, theta: float):
        ffi, lib, _ = self._lib()
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[-1] % 2:
            raise InputError(f"rope x: expected [T, heads, head_dim] with an even head_dim, got {list(x.shape)}")
        out = np.array(x, dtype=np.float32, order="C", copy=True)
        pos = int64_vector(positions, x.shape[0], "positions", 0)
        check(lib.st_rope(ptr(ffi, "float *", out), x.shape[0], x.shape[1], x.shape[2], ptr(ffi, "int64_t *", pos),
                          float(theta)), "rope")
        return out

    def new_cache(self, config, capacity: int, kv_dtype: str | None = None):
        kv_dtype = kv.storage(kv_dtype or self.kv_dtypes[0])
        if kv_dtype not in self.kv_dtypes:
            raise InputError(f"kv_dtype={kv_dtype!r}: the C backend stores its KV cache as one of "
                             f"{', '.join(self.kv_dtypes)}")
        if kv_dtype == "q8_0" and config.head_dim % 32:
            raise InputError(f"kv_dtype='q8_0' needs head_dim % 32 == 0 (blocks of 32), this model's head_dim "
                             f"is {config.head_dim}")
        return CKVCache(config, capacity, kv_dtype)

    def attention(self, q, k, v, cache, ctx, window):
        ffi, lib, pool = self._lib()
        if not isinstance(cache, CLayerKV):
            raise InputError("C backend attention needs a layer of a cache made by its own new_cache()")
        q, k, v = (np.asarray(a) for a in (q, k, v))
        if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] \
                or q.shape[2] != k.shape[2] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise InputError(f"attention: q [T, nH, hd], k/v [T, nKV, hd] with nH % nKV == 0 expected, "
                             f"got q {list(q.shape)} k {list(k.shape)} v {list(v.shape)}")
        T, nH, hd = q.shape
        nKV = k.shape[1]
        cache.spec.check(nKV, hd, window)
        pos = int64_vector(ctx.positions, T, "positions", 0)
        q, k, v = (np.ascontiguousarray(a, np.float32) for a in (q, k, v))
        cache.reserve(T)
        out = np.empty((T, nH * hd), np.float32)
        check(lib.st_attention(pool, ptr(ffi, "float *", q), ptr(ffi, "float *", k), ptr(ffi, "float *", v), T, nH,
                               nKV, hd, cache.kv, ptr(ffi, "int64_t *", pos), int(window or 0),
                               ptr(ffi, "float *", out)), "attention")
        return out, cache

    def route(self, x, router: Param, k: int, softmax: bool):
        m = as_mat(router)
        if not 1 <= int(k) <= m.rows:
            raise InputError(f"route: k={k} must lie in [1, {m.rows}]")
        w, ids = self._routes(x, [router], k, softmax)
        return w[0], ids[0]

    def route_many(self, x, routers: list, k: int, softmax: bool):
        """`route` for several routers of the same input in one C call (weights, ids: [n, T, k]): under a
        memory budget, a layer's own router and the next layers' guesses from its input, one pass of
        the pool instead of one each (docs/memory_budget.md, "Reading ahead across layers")."""
        return self._routes(x, routers, k, softmax)

    def _router_structs(self, routers: list, k: int):
        """The routers as a C array of st_mat pointers (built once per list: a budget step asks for the
        same few lists every layer), how many, and their width; InputError unless they share one and k
        fits."""
        ffi, _ = ffi_lib()
        key = tuple(map(id, routers))
        hit = self._route_structs.get(key)
        if hit is None or any(r.value is not v for r, v in zip(routers, hit[0])):
            mats = [as_mat(r) for r in routers]
            if not mats or any(m.cols != mats[0].cols for m in mats):
                raise InputError(f"route_many: routers of one width needed, got {[[m.rows, m.cols] for m in mats]}")
            hit = self._route_structs[key] = ([r.value for r in routers], mats,
                                              ffi.new("const st_mat *[]", [m.struct for m in mats]),
                                              min(m.rows for m in mats), list(routers))
        _, mats, structs, rows, _ = hit
        if not 1 <= int(k) <= rows:
            raise InputError(f"route_many: k={k} must lie in [1, rows] of the routers, got "
                             f"{[[m.rows, m.cols] for m in mats]}")
        return structs, len(mats), mats[0].cols

    def _routes(self, x, routers: list, k: int, softmax: bool):
        ffi, lib, pool = self._lib()
        structs, n, cols = self._router_structs(routers, k)
        xs = activations(x, cols, "route x")
        T = xs.shape[0]
        w = np.empty((n, T, k), np.float32)
        ids = np.empty((n, T, k), np.int64)
        check(lib.st_route_many(pool, structs, n, ptr(ffi, "float *", xs), T, int(k), int(bool(softmax)),
                                ptr(ffi, "float *", w), ptr(ffi, "int64_t *", ids)), "route_many")
        return w, ids

    def moe(self, x, gate: Param, up: Param, down: Param, ids, weights, sparse: bool | None = None):
        if is_offloaded(gate):
            return self._offloaded_moe(x, gate.raw, up.raw, down.raw, ids, weights, sparse)
        ffi, lib, pool = self._lib()
        g, u, d = as_experts(gate), as_experts(up), as_experts(down)
        if (u.n, u.rows, u.cols) != (g.n, g.rows, g.cols) or (d.n, d.rows, d.cols) != (g.n, g.cols, g.rows):
            raise InputError(f"moe: expert shapes disagree: gate {[g.n, g.rows, g.cols]}, up {[u.n, u.rows, u.cols]}, "
                             f"down {[d.n, d.rows, d.cols]}")
        xs, ids, weights = _moe_inputs(x, ids, weights, g.cols, g.n)
        T, kk = ids.shape
        out = np.empty((T, g.cols), np.float32)
        check(lib.st_moe(pool, g.struct, u.struct, d.struct, ptr(ffi, "float *", xs), T, kk,
                         ptr(ffi, "int64_t *", ids), ptr(ffi, "float *", weights),
                         int(self.sparse if sparse is None else sparse), ptr(ffi, "float *", out)), "moe")
        return out

    def _offloaded_moe(self, x, gate, up, down, ids, weights, sparse):
        """MoE over experts held by the memory-budget cache, in the layout `expert_layout` gave them as they
        were read (the kernels of loaded experts): the picked experts are fetched together, as many as
        the cache holds at once, and run in one C call per group, each token-expert pair as its own row."""
        ffi, lib, pool = self._lib()
        cache, layer = gate.cache, gate.layer
        E, F, H = (int(n) for n in gate.shape)
        xs, ids, weights = _moe_inputs(x, ids, weights, H, E)
        T = xs.shape[0]
        # each part as the cache holds it: converted on read to the layout loaded experts get (see
        # expert_layout), else as stored
        layouts = [self._cached_layout(p) for p in (gate, up, down)]
        picked = list(dict.fromkeys(ids.ravel().tolist()))
        group = max(1, cache.slots - 1)
        out = np.zeros((T, H), np.float32)
        for start in range(0, len(picked), group):
            experts = picked[start:start + group]
            views = cache.get_many(layer, experts)
            G = len(experts)
            structs = []
            for part, lay in enumerate(layouts):
                if views[0][part].nbytes != lay.nbytes:
                    raise InputError(f"moe: expert slot holds {views[0][part].nbytes} bytes, expected {lay.nbytes}")
                ptrs = ffi.new("void *[]", [ffi.cast("void *", v[part].ctypes.data) for v in views])
                structs.append((ptrs, ffi.new("st_experts *", {"experts": ptrs, "n_experts": G, "rows": lay.rows,
                                                                "cols": lay.cols, "row_bytes": lay.row_bytes,
                                                                "fmt": lay.code})))
            local = np.full(E, -1, np.int64)          # expert id -> its place in this group
            local[experts] = np.arange(G)
            if G == len(picked):
                rows_x, pair_ids, pair_w, tok = xs, local[ids], weights, None
            else:   # only the pairs whose expert is in this group, one row each
                tok, slot = np.nonzero(local[ids] >= 0)
                rows_x = np.ascontiguousarray(xs[tok])
                pair_ids = local[ids[tok, slot]][:, None]
                pair_w = weights[tok, slot][:, None]
            n, kk = pair_ids.shape
            part_out = np.empty((n, H), np.float32)
            flat_ids = np.ascontiguousarray(pair_ids, np.int64).reshape(-1)
            flat_w = np.ascontiguousarray(pair_w, np.float32).reshape(-1)
            check(lib.st_moe(pool, structs[0][1], structs[1][1], structs[2][1], ptr(ffi, "float *", rows_x), n, kk,
                             ptr(ffi, "int64_t *", flat_ids), ptr(ffi, "float *", flat_w),
                             int(self.sparse if sparse is None else sparse), ptr(ffi, "float *", part_out)), "moe")
            if tok is None:
                out += part_out
            else:
                np.add.at(out, tok, part_out)
        return out
