"""st_sdk.testing: the conformance kit (contract) a backend author runs to prove every op they provide,
and whole-model logits, against the NumPy reference, for each stored weight format and compute dtype.

- `ConformanceSuite`: pytest base class (see st_sdk/testing/suite.py); imports pytest on first use.
- `check_backend(MyBackend, formats=("f32", "q8_0"), dtypes=(None,)) -> Report`: the same checks
  without pytest; `report.ok`, `report.failures`, `print(report)`.
- `tolerance(fmt, dtype, level, kv_dtype=)`, `FORMAT_TOLERANCE`, `DTYPE_TOLERANCE`, `KV_TOLERANCE`: the
  bounds (st_sdk/testing/tolerances.py).
"""
from __future__ import annotations

from .check import Report, Result, check_backend
from .tolerances import DTYPE_TOLERANCE, FORMAT_TOLERANCE, KV_TOLERANCE, compute_dtype, tolerance

__all__ = ["ConformanceSuite", "check_backend", "Report", "Result", "tolerance", "compute_dtype",
           "FORMAT_TOLERANCE", "DTYPE_TOLERANCE", "KV_TOLERANCE"]


def __getattr__(name: str):
    if name == "ConformanceSuite":   # pytest only when the suite is used
        from .suite import ConformanceSuite

        return ConformanceSuite
    raise AttributeError(f"module 'st_sdk.testing' has no attribute {name!r}")
