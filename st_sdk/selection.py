"""Backend selection: explicit > ST_BACKEND > measured cache > static score. Runs once per load."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .backend import Backend, OpTable, bind_ops
from .errors import BackendError

log = logging.getLogger("st_sdk")


@dataclass
class Candidate:
    name: str
    available: bool = False
    reason: str | None = None
    score: float = 0.0
    validated: bool | None = None
    tokens_per_s: float | None = None
    fallbacks: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    chosen: str
    rule: str
    candidates: list[Candidate]
    ops: OpTable = field(repr=False, default=None)

    def explain(self) -> str:
        lines = [f"backend: {self.chosen} ({self.rule})"]
        for c in self.candidates:
            state = "available" if c.available else f"unavailable: {c.reason}"
            extra = f", fallbacks: {', '.join(c.fallbacks)}" if c.fallbacks else ""
            lines.append(f"  {'*' if c.name == self.chosen else ' '} {c.name:8s} score {c.score:6.1f}  {state}{extra}")
        return "\n".join(lines)


def reference_backend() -> Backend:
    from .registry import get_registry

    cls = get_registry().backends().get("numpy")
    if cls is None:
        raise BackendError("the NumPy reference backend is not registered (is st-sdk installed? "
                           "try `pip install -e .`)")
    return cls()


def smoke_test(backend: Backend, reference: Backend) -> str | None:
    """Run a tiny linear + rms_norm on the backend and compare with the reference; None when right."""
    from .backend import Param
    from .weights.tensor import WeightTensor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = Param(WeightTensor("smoke.w", "f32", (32, 64), rng.standard_normal((32, 64)).astype(np.float32)))
    n = Param(WeightTensor("smoke.n", "f32", (64,), rng.standard_normal(64).astype(np.float32)))
    ops = bind_ops(backend, reference)
    try:
        wp = Param(w.raw, backend.prepare(w, "wq"))
        np_ = Param(n.raw, backend.prepare(n, "attn_norm"))
        got = ops.to_numpy(ops.linear(ops.rms_norm(ops.from_numpy(x), np_, 1e-6), wp))
    except Exception as e:
        return f"smoke op raised {type(e).__name__}: {e}"
    want = reference.linear(reference.rms_norm(x, n, 1e-6), w)
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    return None if err < 2e-2 else f"smoke op disagrees with the reference (relative error {err:.2e})"


def _requested(spec) -> tuple[list[str] | None, str]:
    if isinstance(spec, Backend):
        return [spec.name], "explicit"
    if isinstance(spec, str) and spec != "auto":
        return [s.strip() for s in spec.split(",") if s.strip()], "explicit"
    if isinstance(spec, (list, tuple)):
        return list(spec), "explicit"
    env = os.environ.get("ST_BACKEND", "").strip()
    if env and env != "auto":
        return [s.strip() for s in env.split(",") if s.strip()], "ST_BACKEND"
    return None, "auto"


def select_backend(spec="auto", *, config=None, params=None, dtype=None, n_threads=None, strict=False,
                   tune=False, weight_format=None) -> tuple[Backend, Selection]:
    from .registry import get_registry

    classes = get_registry().backends()
    reference = reference_backend()
    wanted, rule = _requested(spec)
    fmt = weight_format or "f32"
    candidates: list[Candidate] = []
    instances: dict[str, Backend] = {}
    names = wanted if wanted else list(classes)
    for name in names:
        c = Candidate(name)
        candidates.append(c)
        if isinstance(spec, Backend) and spec.name == name:
            b = spec
        elif name not in classes:
            c.reason = f"no backend named {name!r} is registered (known: {', '.join(sorted(classes))})"
            continue
        else:
            b = classes[name](n_threads=n_threads, dtype=dtype)
        try:
            ok = b.is_available()
        except Exception as e:
            ok, c.reason = False, f"is_available() raised {type(e).__name__}: {e}"
        if not ok:
            c.reason = c.reason or b.unavailable_reason() or "unavailable"
            continue
        c.fallbacks = [op for op in bind_ops(b, reference).fallbacks]
        c.details = b.describe()
        c.score = float(b.score(None, fmt))
        problem = smoke_test(b, reference) if b is not reference and name != "numpy" else None
        c.validated = problem is None
        if problem:
            c.reason = problem
            continue
        c.available = True
        instances[name] = b
    usable = [c for c in candidates if c.available]
    if wanted:
        if not usable:
            raise BackendError(f"requested backend {', '.join(wanted)} ({rule}) cannot be used: " +
                               "; ".join(f"{c.name}: {c.reason}" for c in candidates))
        chosen = usable[0]   # first of the priority list that works
        if chosen.name != wanted[0]:
            rule += f" (fell back from {wanted[0]}: {candidates[0].reason})"
    else:
        if not usable:
            raise BackendError("no backend is available: " + "; ".join(f"{c.name}: {c.reason}" for c in candidates))
        chosen = max(usable, key=lambda c: c.score)
        rule = "static score"
    backend = instances[chosen.name]
    sel = Selection(chosen=chosen.name, rule=rule, candidates=candidates,
                    ops=bind_ops(backend, reference, strict=strict))
    log.info("st-sdk backend %s chosen by %s", chosen.name, rule)
    return backend, sel
