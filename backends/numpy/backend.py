"""The NumPy reference backend: every op, float32, exact. The oracle and the fallback."""
from __future__ import annotations

import numpy as np

from st_sdk.backend import Backend

from . import ops


class NumpyBackend(Backend):
    name = "numpy"
    version = np.__version__

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
