"""A backend that accelerates one op, rms_norm; every other op runs on the NumPy reference."""
from __future__ import annotations

import numpy as np

from st_sdk import Backend


class ExampleBackend(Backend):
    name = "example"
    version = "0.1.0"
    # modules `is_available()` imports; a missing one makes the backend "unavailable: missing dependency"
    requires = ("numpy",)
    install_hint = "pip install numpy"

    def score(self, hardware, fmt: str) -> float:
        return 0.5   # below the reference: only chosen when asked for by name (or measured faster)

    def describe(self):
        return {"device": "cpu", "compute_dtype": "float32", "provides": "rms_norm"}

    def prepare(self, param, role):
        # called once per weight at load: keep norm weights as ready float32 arrays, leave the rest
        # stored (the reference fallbacks read `param.raw`, so they need nothing from us)
        if role in ("attn_norm", "ffn_norm", "norm"):
            return np.ascontiguousarray(param.raw.numpy(), dtype=np.float32)
        return param.raw

    @staticmethod
    def rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        # one pass over x for the mean square, in float64 to avoid overflow on large activations
        ms = np.einsum("...i,...i->...", x, x, dtype=np.float64) / x.shape[-1]
        scale = (1.0 / np.sqrt(ms + eps)).astype(np.float32)[..., None]
        w = weight.value if isinstance(weight.value, np.ndarray) else weight.raw.numpy()
        return x * scale * w
