"""Backend: the base class every compute backend subclasses (contract), and the op-table binding.

A backend overrides the ops it accelerates. Any op it does not override runs on the NumPy reference,
with its arrays converted at the boundary; the binding records each such fallback so that the
selection report can show it, and `strict=True` turns a fallback into an error.

Shapes use T for tokens in the step (batch is 1), H hidden size, nH / nKV query / key-value heads,
hd head dim, E experts, F expert width, k active experts. Activations are the backend's own array type
(float32 unless the backend documents a compute dtype); `to_numpy`/`from_numpy` cross the boundary.
Weights arrive as `Param`: `param.raw` is the stored `WeightTensor` (any format), `param.value` is
what this backend's `prepare` made of it, once, at load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import BackendError
from .weights.tensor import WeightTensor

#: ops every graph step uses, in forward order
CORE_OPS = ("embed", "rms_norm", "linear", "rope", "new_cache", "attention", "route", "moe")
#: optional fused ops: a backend that provides them replaces a whole layer or a whole step
FUSED_OPS = ("layer", "forward")
OPS = CORE_OPS + FUSED_OPS


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

    Subclasses set `name` and `version`, implement `is_available`, and override any of the ops below.
    The NumPy reference backend implements all of them and documents their exact semantics.
    """

    name: str = ""
    version: str = "0"
    #: modules the default `is_available` imports (lazily); the first that fails is the reason shown
    requires: tuple[str, ...] = ()
    #: how to get the missing dependencies, appended to the reason ('pip install -e ".[torch]"')
    install_hint: str = ""
    #: formats whose `linear`/`moe` this backend computes natively (others fall back or get converted)
    formats: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0")

    def __init__(self, n_threads: int | None = None, dtype: str | None = None):
        self.n_threads = n_threads
        self.dtype = dtype

    # ---- control plane -------------------------------------------------------------------
    def is_available(self) -> bool:
        """True when the backend's dependencies import here. Import them lazily, in this method.

        The default imports each module of `requires` and remembers the first failure."""
        import importlib

        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except Exception as e:
                hint = f"; install it with `{self.install_hint}`" if self.install_hint else ""
                self._unavailable = f"missing dependency {mod!r} ({type(e).__name__}: {e}){hint}"
                return False
        return True

    def unavailable_reason(self) -> str | None:
        """Why `is_available()` is False (the missing dependency, the failed build...)."""
        return getattr(self, "_unavailable", None)

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

    def prepare(self, param: Param, role: str) -> Any:
        """Convert/place one weight once at load; role is the LayerParams field name or
        'embed' / 'norm' / 'head'. The default keeps the stored tensor."""
        return param.raw

    def prepare_model(self, params: ModelParams, config: Any) -> None:
        """Called once after every param is prepared: build fused/whole-model state in params.extra."""

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def from_numpy(self, x: np.ndarray) -> Any:
        return x

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
    rope: Callable
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

    def wrapped(self, wrapper: Callable[[str, Callable], Callable]) -> "OpTable":
        """A copy whose every op is `wrapper(name, op)`: tracing and profiling wrap the table."""
        changes = {op: (wrapper(op, getattr(self, op)) if getattr(self, op) is not None else None) for op in OPS}
        return OpTable(**{**self.__dict__, **changes})


def _fallback(op: str, ref: Callable, backend: Backend) -> Callable:
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


def bind_ops(backend: Backend, reference: Backend, strict: bool = False) -> OpTable:
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
            table[op] = _fallback(op, getattr(reference, op), backend)
    for op in FUSED_OPS:
        table[op] = getattr(backend, op) if op in provided else None
    return OpTable(**table, to_numpy=backend.to_numpy, from_numpy=backend.from_numpy,
                   native=sorted(provided), fallbacks=[] if backend is reference else
                   [op for op in CORE_OPS if op not in provided and "forward" not in provided])
