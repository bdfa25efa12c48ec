"""The weight bytes one decoded token reads: decode is memory-bound, so these bytes over the measured
read bandwidth give a decode ceiling."""
from __future__ import annotations

import os

from ..loader import weight_format
from ..sizes import bytes_per_token
from ..weights import open_model


def gguf_bytes_per_token(path: str | os.PathLike) -> int:
    """The same count for a model file, read through st-sdk's own (fast) reader without a backend."""
    f = open_model(path)
    return bytes_per_token(f.params(), f.config)


def gguf_format(path: str | os.PathLike) -> str:
    """The dominant weight type of a model file (by bytes), as an st-sdk format name."""
    return weight_format(open_model(path).params())
