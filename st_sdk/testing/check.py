"""Run the conformance cases on a backend: the plain-function API (`check_backend`) and the single-case
runner the pytest suite uses."""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..backend import Backend
from .cases import CASES, NOT_STORED, WEIGHTED, Ctx, Measure
from .tolerances import canonical_dtype, compute_dtype, tolerance

#: what `check_backend` checks: every op the backend provides, then the whole model
MODEL_CHECK = "model"


@dataclass
class Result:
    op: str
    case: str
    fmt: str | None
    dtype: Any
    status: str                     # "pass", "fail", "skip"
    tol: float | None = None
    err: float | None = None        # the worst measure's relative error
    detail: str = ""
    measures: list[Measure] = field(default_factory=list)
    compute_dtype: str | None = None   # what the backend reports computing in (decides the tolerance)

    @property
    def id(self) -> str:
        return "-".join(str(p) for p in (self.op, self.case, self.fmt or "", self.dtype or "") if p)

    def __str__(self) -> str:
        err = "" if self.err is None else f" err {self.err:.2e} (tol {self.tol:.0e}, {self.compute_dtype})"
        return f"{self.status.upper():4s} {self.id}{err}{': ' + self.detail if self.detail else ''}"


@dataclass
class Report:
    backend: str
    results: list[Result]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def passed(self) -> list[Result]:
        return [r for r in self.results if r.status == "pass"]

    def __str__(self) -> str:
        head = (f"conformance of backend {self.backend!r}: {len(self.passed)} passed, "
                f"{len(self.failures)} failed, {len(self.results) - len(self.passed) - len(self.failures)} skipped")
        return "\n".join([head, *(f"  {r}" for r in self.results)])


def make_backend(backend, dtype=None, n_threads: int | None = None) -> Backend:
    """An instance of `backend` (a Backend subclass, or an instance used as is)."""
    if isinstance(backend, Backend):
        return backend
    return backend(n_threads=n_threads, dtype=dtype)


def effective_dtype(backend: Backend, requested=None) -> str:
    """The compute dtype the backend reports (describe()["compute_dtype"]), else the one requested:
    a backend that computes in bfloat16 by default is judged by the bfloat16 bounds."""
    try:
        return compute_dtype(backend)
    except Exception:
        return canonical_dtype(requested)


def op_formats(op: str, formats: Iterable[str]) -> list[str | None]:
    """The formats `op` is checked with: None for ops without weights; never a format that op's weights
    are not stored in (norms and routers stay full precision beside Q8_0/Q4_0 matrices)."""
    if op not in WEIGHTED:
        return [None]
    return [f for f in formats if f not in NOT_STORED.get(op, ())]


def skip_reason(backend: Backend, op: str, fmt: str | None) -> str | None:
    """Why this op/format pair is not checked on this backend, or None."""
    if op != MODEL_CHECK and op not in backend.provides():
        instead = "its own `linear`, three times" if op == "qkv" else \
            "the graph's parts" if op in ("layer", "forward") else "the NumPy reference"
        return f"backend '{backend.name}' does not provide '{op}' (it runs on {instead})"
    if fmt in NOT_STORED.get(op, ()):
        return f"'{op}' weights are never stored as {fmt} (they stay full precision)"
    return None


def run_case(backend: Backend, reference: Backend, op: str, case: str, fmt: str | None, dtype=None,
             overrides: dict | None = None, seed: int = 0) -> Result:
    """Run one named case and judge it against the tolerance table."""
    fn = dict(CASES[op])[case]
    reason = skip_reason(backend, op, fmt)
    if reason:
        return Result(op, case, fmt, dtype, "skip", detail=reason)
    computes_in = effective_dtype(backend, dtype)
    tol = tolerance(fmt if op in WEIGHTED else None, computes_in,
                    "model" if op in (MODEL_CHECK, "forward") else "op", overrides)
    try:
        measures = fn(Ctx(backend, reference, fmt if op in WEIGHTED else None, computes_in, seed))
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Result(op, case, fmt, dtype, "fail", tol, math.inf,
                      f"raised {type(e).__name__}: {e} (at {where.filename}:{where.lineno})",
                      compute_dtype=computes_in)
    worst = max(measures, key=lambda m: m.err)
    bad = [m for m in measures if not m.err <= tol]
    detail = "; ".join(f"{m.label}: err {m.err:.2e} {m.detail}" for m in bad)
    return Result(op, case, fmt, dtype, "fail" if bad else "pass", tol, worst.err, detail, measures, computes_in)


def check_backend(backend, formats: Iterable[str] = ("f32",), dtypes: Iterable = (None,),
                  ops: Iterable[str] | None = None, overrides: dict | None = None,
                  n_threads: int | None = None) -> Report:
    """Check every op `backend` provides (or only `ops`), and whole-model logits, against the NumPy
    reference for each stored weight format and compute dtype; returns a Report (`.ok`, `.failures`,
    printable). An unavailable backend yields one skipped result that says why."""
    from ..registry import reference_backend

    reference = reference_backend()
    results: list[Result] = []
    for dtype in dtypes:
        b = make_backend(backend, dtype, n_threads)
        if not b.is_available():
            results.append(Result("*", "available", None, dtype, "skip",
                                  detail=f"unavailable: {b.unavailable_reason() or 'no reason given'}"))
            continue
        wanted = list(ops) if ops is not None else [op for op in CASES if op != MODEL_CHECK] + [MODEL_CHECK]
        for op in wanted:
            if op == "new_cache":
                continue   # checked with attention
            for fmt in op_formats(op, formats):
                for case, _ in CASES[op]:
                    results.append(run_case(b, reference, op, case, fmt, dtype, overrides))
    return Report(getattr(backend, "name", str(backend)), results)
