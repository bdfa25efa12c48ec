"""Backend: the base class every compute backend subclasses (contract), and the op-table binding.

A backend overrides the ops it accelerates. Any op it does not override runs on the NumPy reference,
with its arrays converted at the boundary; the binding records each such fallback so that the
selection report can show it, and `strict=True` turns a fallback into an error.

Shapes use T for tokens in the step, H hidden size, nH / nKV query / key-value heads,
hd head dim, E experts, F expert width, k active experts. Activations are the backend's own array type
(float32 unless the backend documents a compute dtype); `to_numpy`/`from_numpy` cross the boundary.
Weights arrive as `Param`: `param.raw` is the stored `WeightTensor` (any format), `param.value` is
what this backend's `prepare` made of it, once, at load.

The op set (contract; the NumPy reference in backends/numpy/ops.py is the exact semantics):
    context(config, positions) -> ctx   what every layer of one step shares (`StepContext`)
    embed(table, ids) -> [T, H]         ids: int64 NumPy [T]
    rms_norm(x, weight, eps) -> like x
    linear(x, weight) -> [T, N]         weight [N, K], any stored format
    qkv(x, wq, wk, wv) -> q [T, nH*hd], k, v [T, nKV*hd]   (default: three `linear`s)
    rope(q, k, ctx) -> (q, k)           q [T, nH, hd], k [T, nKV, hd] rotated to ctx's positions
    new_cache(config, capacity) -> cache with `.layers`, one per layer
    attention(q, k, v, layer_cache, ctx, window) -> (out [T, nH*hd], layer_cache)
                                        appends k, v to the layer's cache and returns it (a backend
                                        whose arrays are immutable returns the updated one)
    route(x, router, k, softmax) -> (weights [T, k], ids [T, k])
    moe(x, gate, up, down, ids, weights) -> [T, H]
and the optional fused ops `layer(config, i, layer_params, h, ctx, layer_cache) -> (h, layer_cache)`
and `forward(config, params, ids, positions, cache, last_only) -> logits`.

Batched steps (several sequences in one step, docs/serving.md): the graph packs B sequences' tokens
into one [T, H] activation, T = seg[-1], where sequence b owns rows seg[b]..seg[b+1]-1 (seg: int64
[B+1], seg[0] = 0, each segment non-empty) and has its own KV cache. Every op but attention is
row-wise, so it runs once on all T rows, under one step context of all T positions;
    attention_batch(q, k, v, layer_caches, ctxs, seg, window) -> (out [T, nH*hd], layer_caches)
runs attention per sequence (ctxs: each sequence's own step context). A backend that does not provide
it gets one built from its `attention` and `concat`; the optional fused
    forward_batch(config, params, ids, positions, caches, seg) -> logits [B, vocab]
runs the whole batched step (each sequence's last row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import BackendError
from .weights.tensor import WeightTensor

#: ops every graph step uses, in forward order; one a backend lacks runs on the NumPy reference
CORE_OPS = ("embed", "rms_norm", "linear", "rope", "new_cache", "attention", "route", "moe")
#: ops with a default made of the backend's own (never a fallback): the step context and q/k/v
STEP_OPS = ("context", "qkv")
#: optional fused ops: a backend that provides them replaces a whole layer or a whole step
FUSED_OPS = ("layer", "forward")
#: ops of batched steps: attention of several sequences (built from `attention` when not provided) and
#: an optional whole batched step
BATCH_OPS = ("attention_batch", "forward_batch")
OPS = CORE_OPS + STEP_OPS + FUSED_OPS + BATCH_OPS


class StepContext:
    """What every layer of one step shares (contract): made once per step by the `context` op and
    entered for the step (`with ops.context(config, positions) as ctx:`).

    `positions` are the step's absolute positions (int64 NumPy [T], host memory) and `theta` RoPE's
    base. A backend subclasses it to carry more (its positions on the device, RoPE tables, a padding
    mask) and to set up and tear down a step in `__enter__`/`__exit__`."""

    __slots__ = ("positions", "theta")

    def __init__(self, positions, theta: float):
        self.positions = positions
        self.theta = theta

    def __enter__(self) -> "StepContext":
        return self

    def __exit__(self, *exc) -> None:
        return None


class Param:
    """One model weight: the stored tensor and this backend's prepared form of it."""

    __slots__ = ("raw", "value")

    def __init__(self, raw: WeightTensor, value: Any = None):
        self.raw = raw
        self.value = raw if value is None else value

    @property
    def name(self) -> str:
        return self.raw.name

    def __repr__(self) -> str:
        return f"Param({self.raw.name}, {self.raw.fmt}{list(self.raw.shape)})"


#: the role of each weight, as `Backend.prepare(param, role)` receives it
NORM_ROLES = ("attn_norm", "ffn_norm", "norm")
MATRIX_ROLES = ("embed", "head", "wq", "wk", "wv", "wo", "router")
EXPERT_ROLES = ("gate", "up", "down")
#: kept float32 whatever a backend computes in: cheap, and the router's precision decides the top-k
FLOAT32_ROLES = NORM_ROLES + ("router",)
#: the compute dtypes a backend may offer, and the short names users also write
COMPUTE_DTYPES = ("float32", "bfloat16")
DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16"}


def is_offloaded(param: Param) -> bool:
    """True for experts that a memory budget leaves in the file (read through st_sdk.offload's cache,
    never prepared by a backend)."""
    return bool(getattr(param.raw, "offloaded", False))


@dataclass
class LayerParams:
    attn_norm: Param
    wq: Param
    wk: Param
    wv: Param
    wo: Param
    ffn_norm: Param
    router: Param
    gate: Param   # [E, F, H]
    up: Param     # [E, F, H]
    down: Param   # [E, H, F]


@dataclass
class ModelParams:
    embed: Param
    layers: list[LayerParams]
    norm: Param
    head: Param   # the embedding itself when tied
    extra: dict[str, Any] = field(default_factory=dict)   # backend-owned state built by prepare_model

    def all(self):
        yield "embed", self.embed
        for i, lp in enumerate(self.layers):
            for f in lp.__dataclass_fields__:
                yield f"layers.{i}.{f}", getattr(lp, f)
        yield "norm", self.norm
        if self.head is not self.embed:
            yield "head", self.head


class Backend:
    """Base class of a compute backend (contract).

    Subclasses set `name` and `version`, do their one-time work in `setup` (or list `requires`), and
    override any of the ops below. The NumPy reference backend implements all of them and documents
    their exact semantics.
    """

    name: str = ""
    version: str = "0"
    #: modules the default `is_available` imports (lazily); the first that fails is the reason shown
    requires: tuple[str, ...] = ()
    #: how to get the missing dependencies, appended to the reason ('pip install -e ".[torch]"')
    install_hint: str = ""
    #: stored weight formats whose ops this backend runs as stored (contract; names: st_sdk.weights.tensor.FORMATS)
    formats: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0")
    #: stored formats it converts at load into one it runs (dequantised or repacked: the selection report
    #: says so). A file holding a type in neither list is refused at load, naming the tensor (contract).
    converts: tuple[str, ...] = ()
    #: KV-cache storage types its `new_cache(config, capacity, kv_dtype=...)` accepts, the default first
    #: ("f16", "q8_0", "f32", ...: st_sdk.config.KV_ITEM_BYTES); empty when its new_cache takes no
    #: kv_dtype (contract). `load(..., kv_dtype=)` picks one; the conformance kit checks each.
    kv_dtypes: tuple[str, ...] = ()

    #: why `is_available()` is False (the missing dependency, the failed build...), else None
    unavailable: str | None = None
    #: `setup()` has run and succeeded
    ready: bool = False

    def __init__(self, n_threads: int | None = None, dtype: str | None = None):
        self.n_threads = n_threads
        self.dtype = dtype

    # ---- control plane -------------------------------------------------------------------
    def is_available(self) -> bool:
        """True when the backend can run here: every module of `requires` imports and `setup()`
        succeeds. Runs them once (later calls answer from memory); on failure `unavailable` says why."""
        if self.ready:
            return True
        if self.unavailable is not None:
            return False
        import importlib

        hint = f"; install it with `{self.install_hint}`" if self.install_hint else ""
        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except Exception as e:
                self.unavailable = f"missing dependency {mod!r} ({type(e).__name__}: {e}){hint}"
                return False
        try:
            self.setup()
        except ImportError as e:
            self.unavailable = f"missing dependency ({type(e).__name__}: {e}){hint}"
            return False
        except Exception as e:   # a broken install (a CUDA driver, a failed build) must not break selection
            self.unavailable = str(e) if isinstance(e, BackendError) else \
                f"{self.name} failed to set up: {type(e).__name__}: {e}"
            return False
        self.ready = True
        return True

    def setup(self) -> None:
        """Get ready to run, once: import heavy libraries, pick the device, the dtype, the kernels.
        Called by `is_available()` (selection probes every candidate; `bind_ops` checks it), never
        by an op. Raise to make the backend unavailable: an ImportError or BackendError message is
        the reason shown. The default does nothing."""

    def check_available(self) -> None:
        """BackendError unless `is_available()`: what the control plane calls before using a backend."""
        if not self.is_available():
            raise BackendError(f"backend '{self.name}' is unavailable: "
                               f"{self.unavailable_reason() or 'is_available() returned False'}")

    def unavailable_reason(self) -> str | None:
        """Why `is_available()` is False (the missing dependency, the failed build...)."""
        return self.unavailable

    def score(self, hardware: Any, fmt: str) -> float:
        """Static preference on this hardware for weights of `fmt` (higher is better).

        `hardware` is a `st_sdk.hardware.HardwareInfo` (`.features`, `.physical_cores`, `.gpus` ...).
        Measured decode speed, when available, overrides this ranking."""
        return 0.0

    def devices(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> dict[str, Any]:
        """Extra facts for the selection report (device, compute dtype, kernel variant...)."""
        return {}

    def sparsity(self, reset: bool = False) -> dict[str, Any] | None:
        """Sparse ReGLU counters, for backends whose expert kernels skip dead neurons (None otherwise):
        live_fraction (neurons with relu(gate) > 0 over all token-expert pairs), layer_live_fraction,
        tokens, expert_bytes_per_token (weight bytes the expert kernels read; down_bytes_per_token of them
        the down projection's, the rest gate and up) and dense_expert_bytes_per_token (what a dense pass
        reads), since the last reset=True call."""
        return None

    def prepare(self, param: Param, role: str) -> Any:
        """Convert/place one weight once at load; role is the LayerParams field name or
        'embed' / 'norm' / 'head'. The default keeps the stored tensor."""
        return param.raw

    def expert_layout(self, fmt: str, rows: int, cols: int, role: str) -> Any:
        """Under a memory budget, how this backend's `moe` wants one expert matrix ([rows, cols] of
        `fmt`; role 'gate', 'up' or 'down') stored in the expert cache: None for the file's layout, or
        an object with `nbytes` and `convert(src, out)` that writes the stored bytes (uint8) into `out`
        in its own layout. The cache converts each expert as it is read, on its I/O threads (so
        `convert` should release the GIL), and passes the object back in `OffloadedExperts.layout(e)`.
        Only asked of backends with `supports_offload` (True: the automatic choice under a budget may
        pick it; "named": it runs on the cache when asked for by name, but "auto" does not probe it,
        because importing its framework would take much of the budget)."""
        return None

    def expert_layouts(self, shapes: list[list[tuple]], live_shares: list | None = None,
                       kept_layouts: list[str] | None = None) -> list[list[Any]]:
        """Under a memory budget, `expert_layout` of every expert matrix: shapes[layer] lists the (fmt, rows,
        cols, role) of its gate, up and down. live_shares: each layer's share of live expert neurons (None
        for a layer not seen) over earlier runs on the same files (st_sdk.offload.profile), or None, for
        a backend that lays a layer out by it (the C backend's sparse ReGLU layouts). Such a backend
        reports each layer's choice in `layer_layouts` (strings); they are kept with the shares, and a
        later load passes them back as kept_layouts (only to a backend of the same name), so that it can
        keep a layer's layout while its share stays near a threshold."""
        return [[self.expert_layout(*part) for part in layer] for layer in shapes]

    #: optional: a fused layer for memory-budget mode, offloaded_layer(config, i, layer_params, h, ctx,
    #: layer_cache, route) -> (h, layer_cache), whose experts are `OffloadedExperts` read through the
    #: cache. It must pick experts by calling `route(x, router, k, softmax)` (which starts their reads)
    #: on the raw layer input, then take the picked ones with `cache.get_many`; or route itself, when
    #: `route.route_many` is set (the route op is the backend's), applying `route.routers(layer)` and
    #: handing their picks to `route.picked` before taking the experts, or to `route.used` when it ran
    #: the layer from experts the cache's `table` showed resident (st_sdk.offload.experts.PrefetchingRoute);
    #: after `route.picked` it may still run the layer from its resident experts, counting them with
    #: `cache.used(layer, picks)`.
    #: Used only by backends with `supports_offload` whose `moe` is native; without it a budget runs the
    #: graph op by op.
    offloaded_layer: Callable | None = None
    #: optional, beside offloaded_layer: every layer of a step under a memory budget,
    #: offloaded_layers(config, layer_params, h, ctx, cache, route) -> h (cache: the step's KV cache),
    #: telling `route.ran_whole(layer, own_picks, counted)` of the layers it ran from resident experts, in
    #: layer order, before the next layer that starts reads does so (counted: it counted their uses itself
    #: on `cache.use_arrays()`, then calls `cache.counted()`).
    offloaded_layers: Callable | None = None

    def row_read_weights(self, params: ModelParams) -> list:
        """Of these prepared params, the arrays this backend reads only a row at a time, straight from a
        read-only file map (an embedding table that nothing else reads whole): a memory budget counts
        only the rows read (st_sdk.weights.mapping.read_by_rows) and may drop their pages again. Default:
        none (every weight counted as resident)."""
        return []

    def step_scratch_bytes(self, config: Any, tokens: int, context: int) -> int | None:
        """Under a memory budget: the most bytes of activations (weights and KV cache not counted) one
        step of `tokens` tokens of one sequence holds on this backend, with up to `context` positions
        cached before them. The plan sets this aside for a step instead of its default reserve
        (st_sdk.offload.experts.ACTIVATION_BYTES). Default: None (not known; the reserve stays)."""
        return None

    def prepare_model(self, params: ModelParams, config: Any) -> None:
        """Called once after every param is prepared: build fused/whole-model state in params.extra."""

    def context(self, config: Any, positions) -> StepContext:
        """The step context of `positions` (default: the positions on the host and RoPE's base)."""
        return StepContext(np.asarray(positions, dtype=np.int64), float(config.rope_theta))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def from_numpy(self, x: np.ndarray) -> Any:
        return x

    def concat(self, xs: list) -> Any:
        """Arrays of this backend joined along the first axis (what a batched step's per-sequence
        attention outputs need). The default goes through NumPy; backends override it."""
        return self.from_numpy(np.concatenate([self.to_numpy(x) for x in xs]))

    def runs(self, fmt: str) -> bool:
        """Whether weights stored as `fmt` can be loaded on this backend (natively or converted)."""
        return fmt in self.formats or fmt in self.converts

    def provides(self) -> list[str]:
        """The ops this class overrides."""
        return [op for op in OPS if getattr(type(self), op, None) is not getattr(Backend, op, None)
                and getattr(type(self), op, None) is not None]


@dataclass
class OpTable:
    """Plain callables the graph calls directly: no hook dispatch per op."""

    embed: Callable
    rms_norm: Callable
    linear: Callable
    qkv: Callable
    rope: Callable
    context: Callable
    new_cache: Callable
    attention: Callable
    route: Callable
    moe: Callable
    layer: Callable | None
    forward: Callable | None
    to_numpy: Callable
    from_numpy: Callable
    native: list[str]
    fallbacks: list[str]
    # batched steps (bind_ops fills them; a table built by hand for one-sequence steps may leave them)
    attention_batch: Callable | None = None
    forward_batch: Callable | None = None
    concat: Callable | None = None
    #: memory-budget mode's run of a step's every layer, layers(config, layer_params, h, ctx, cache) -> h
    #: (st_sdk.offload.experts.offload_ops: the backend's `offloaded_layers`), or None
    layers: Callable | None = None

    def wrapped(self, wrapper: Callable[[str, Callable], Callable]) -> "OpTable":
        """A copy whose every op is `wrapper(name, op)`: tracing and profiling wrap the table."""
        changes = {op: (wrapper(op, getattr(self, op)) if getattr(self, op) is not None else None)
                   for op in OPS + ("layers",)}
        if "attention_batch" not in self.native and self.concat is not None:   # built from attention: rebuild it
            changes["attention_batch"] = wrapper("attention_batch", batched_attention(changes["attention"], self.concat))
        return OpTable(**{**self.__dict__, **changes})


def fallback_op(op: str, ref: Callable, backend: Backend) -> Callable:
    """`ref` (the reference's op) callable with `backend`'s arrays: inputs go through its `to_numpy`,
    outputs through its `from_numpy`. What `bind_ops` puts in the table for an op a backend lacks."""
    to_np, from_np = backend.to_numpy, backend.from_numpy
    if op == "new_cache":
        return ref

    def convert(a):
        return to_np(a) if not isinstance(a, (np.ndarray, Param, int, float, bool, type(None), tuple)) \
            and hasattr(a, "shape") else a

    def call(*args, **kwargs):
        out = ref(*[convert(a) for a in args], **kwargs)
        if isinstance(out, tuple):
            return tuple(from_np(o) if isinstance(o, np.ndarray) else o for o in out)
        return from_np(out)

    call.__name__ = f"{op}_fallback"
    return call


def _qkv_of(linear: Callable) -> Callable:
    """The `qkv` op of a backend that does not fuse it: three products."""
    def qkv(x, wq, wk, wv):
        return linear(x, wq), linear(x, wk), linear(x, wv)
    return qkv


def bind_ops(backend: Backend, reference: Backend, strict: bool = False) -> OpTable:
    """The op table of `backend`: its own ops, the reference's (converted) for those it lacks."""
    backend.check_available()
    provided = set(backend.provides())
    missing = [op for op in CORE_OPS if op not in provided]
    if "forward" in provided:
        missing = []   # a whole-step backend never calls the parts inside the graph
    # attention and its cache live together: a backend that does not provide both uses neither
    if ("attention" in provided) != ("new_cache" in provided):
        raise BackendError(f"backend '{backend.name}' must provide both 'attention' and 'new_cache' or neither")
    if strict and missing and backend is not reference:
        raise BackendError(f"backend '{backend.name}' does not provide op(s) {', '.join(missing)} "
                           f"and strict=True forbids falling back to the NumPy reference")
    table: dict[str, Any] = {}
    for op in CORE_OPS:
        if op in provided:
            table[op] = getattr(backend, op)
        else:
            table[op] = fallback_op(op, getattr(reference, op), backend)
    table["context"] = backend.context
    table["qkv"] = backend.qkv if "qkv" in provided else _qkv_of(table["linear"])
    for op in FUSED_OPS:
        table[op] = getattr(backend, op) if op in provided else None
    # attention_batch lives with attention and its cache: the backend's own only beside its attention
    table["attention_batch"] = backend.attention_batch if "attention_batch" in provided and "attention" in provided \
        else batched_attention(table["attention"], backend.concat)
    table["forward_batch"] = backend.forward_batch if "forward_batch" in provided else None
    return OpTable(**table, to_numpy=backend.to_numpy, from_numpy=backend.from_numpy, concat=backend.concat,
                   native=sorted(provided), fallbacks=[] if backend is reference else
                   [op for op in CORE_OPS if op not in provided and "forward" not in provided])


def batched_attention(attention: Callable, concat: Callable) -> Callable:
    """attention_batch(q, k, v, layer_caches, ctxs, seg, window) from a one-sequence attention op: each
    sequence's rows against its own layer cache and step context, outputs joined in row order."""
    def attention_batch(q, k, v, caches, ctxs, seg, window):
        outs, kept = [], []
        for cache, ctx, a, b in zip(caches, ctxs, seg[:-1], seg[1:]):
            out, cache = attention(q[a:b], k[a:b], v[a:b], cache, ctx, window)
            outs.append(out)
            kept.append(cache)
        return (outs[0] if len(outs) == 1 else concat(outs)), kept

    return attention_batch


def prepare_params(backend: Backend, params: ModelParams, config: Any) -> ModelParams:
    """Each weight through `backend.prepare` once (shared tensors, like a tied head, once), then
    `backend.prepare_model`."""
    done: dict[int, Param] = {}

    def prep(p: Param, role: str) -> Param:
        if is_offloaded(p):
            return p   # experts under a memory budget are read through the cache, never prepared
        if id(p) not in done:
            done[id(p)] = Param(p.raw, backend.prepare(p, role))
        return done[id(p)]

    embed = prep(params.embed, "embed")
    prepared = ModelParams(embed=embed, layers=[], norm=prep(params.norm, "norm"),
                           head=prep(params.head, "head") if params.head is not params.embed else embed)
    for lp in params.layers:
        prepared.layers.append(type(lp)(**{f: prep(getattr(lp, f), f) for f in lp.__dataclass_fields__}))
    backend.prepare_model(prepared, config)
    return prepared
