"""The NumPy reference backend: every op, float32, exact. The oracle and the fallback."""
from __future__ import annotations

import numpy as np

from st_sdk.backend import Backend
from st_sdk.weights.tensor import FORMATS

from . import ops


class NumpyBackend(Backend):
    name = "numpy"
    version = np.__version__
    formats = FORMATS   # every type gguf-py dequantises, dequantised per use

    def score(self, hardware, fmt: str) -> float:
        return 1.0   # always works, never fast

    def describe(self):
        return {"device": "cpu", "compute_dtype": "float32"}

    embed = staticmethod(ops.embed)
    rms_norm = staticmethod(ops.rms_norm)
    linear = staticmethod(ops.linear)
    rope = staticmethod(ops.rope)
    new_cache = staticmethod(ops.new_cache)
    attention = staticmethod(ops.attention)
    route = staticmethod(ops.route)
    moe = staticmethod(ops.moe)
