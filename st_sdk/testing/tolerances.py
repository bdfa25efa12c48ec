"""How close a backend must come to the NumPy reference, per stored weight format and compute dtype.

Every figure is relative: max|got - want| <= tol * max|want|, where `want` is the reference run on the
*same stored weights* (dequantised exactly). So the weight format only loosens the bound where a
backend may legitimately round *activations* too (8-bit activation blocks for integer dot products,
as llama.cpp does for Q8_0/Q4_0), and the compute dtype loosens it by its own rounding.
"""
from __future__ import annotations

import re

from ..weights.tensor import QUANT_SIZES

#: weight format -> (op tolerance, whole-model tolerance) with float32 compute
FORMAT_TOLERANCE = {
    "f32": (1e-4, 1e-4),
    "f16": (1e-4, 1e-4),
    "bf16": (1e-4, 1e-4),
    "q8_0": (3e-2, 6e-2),    # activations may be quantised to 8 bits per block of 32 (the C backend's
    "q4_0": (3e-2, 6e-2),    # integer kernels measure ~1e-2 on moe, ~1.3e-2 on whole-model logits),
    # and so for every other block format: 8-bit activation blocks of 32 (q4_1..iq4_nl) or ggml's Q8_K
    # blocks of 256 (the k-quants, iq4_xs), as llama.cpp's CPU kernels do
    **{f: (3e-2, 6e-2) for f in QUANT_SIZES if f not in ("q8_0", "q4_0")},
}

#: compute dtype -> (op tolerance, whole-model tolerance); None means float32
DTYPE_TOLERANCE = {
    "float32": (1e-4, 1e-4),
    "float16": (5e-3, 2e-2),   # 11-bit mantissa
    "bfloat16": (3e-2, 8e-2),  # 8-bit mantissa
}

_DTYPE_ALIASES = {
    None: "float32", "f32": "float32", "fp32": "float32", "float32": "float32",
    "f16": "float16", "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}

#: above this whole-model tolerance a rounding difference may legitimately flip a top-k choice, so the
#: whole-model check routes every token to all experts (top-k itself is checked op by op)
LOSSY = 1e-3


def canonical_dtype(dtype) -> str:
    """'float32' / 'float16' / 'bfloat16' from an alias, a torch/jax dtype, or a description that
    starts with one (`Backend.describe()["compute_dtype"]` such as "float32 (q8 activations)")."""
    if dtype is None:
        return "float32"
    text = str(dtype).lower().replace("torch.", "").replace("jnp.", "")
    key = re.split(r"[\s(,;]", text.strip(), maxsplit=1)[0]
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown compute dtype {dtype!r}; known: {sorted(k for k in _DTYPE_ALIASES if k)}")
    return _DTYPE_ALIASES[key]


def compute_dtype(backend) -> str:
    """The canonical compute dtype a backend instance reports in `describe()` (float32 if it says none)."""
    return canonical_dtype(backend.describe().get("compute_dtype") or backend.dtype)


def tolerance(fmt: str | None, dtype=None, level: str = "op", overrides: dict | None = None) -> float:
    """The relative tolerance for an op (`level="op"`) or whole-model logits (`level="model"`).

    fmt None means an op without weights (rope, attention). `overrides` maps (fmt, dtype) or fmt or
    dtype to a (op, model) pair and wins over the table; an author who loosens a bound should say why.
    """
    col = {"op": 0, "model": 1}[level]
    d = canonical_dtype(dtype)
    for key in ((fmt, d), (fmt, dtype), fmt, d):
        if overrides and key in overrides:
            return float(overrides[key][col])
    return max(FORMAT_TOLERANCE[fmt or "f32"][col], DTYPE_TOLERANCE[d][col])


def table() -> str:
    """The tolerance table as Markdown (what docs/conformance.md shows)."""
    rows = ["| weight format \\ compute dtype | " + " | ".join(DTYPE_TOLERANCE) + " |",
            "|---|" + "---|" * len(DTYPE_TOLERANCE)]
    for fmt in FORMAT_TOLERANCE:
        cells = [f"{tolerance(fmt, d):.0e} / {tolerance(fmt, d, 'model'):.0e}" for d in DTYPE_TOLERANCE]
        rows.append(f"| {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
