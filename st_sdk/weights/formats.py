"""The weight formats: gguf's type names in lower case, their block sizes and storage dtypes.

A leaf module (numpy only), so that the C backend's ops and the core's tensors can both use it."""
from __future__ import annotations

import numpy as np

#: block format -> (weights per block, bytes per block): gguf.GGML_QUANT_SIZES for every type that
#: gguf-py dequantises (a test keeps the two equal; written out so that importing st_sdk needs no gguf)
QUANT_SIZES = {
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    "iq4_nl": (32, 18), "iq4_xs": (256, 136),
    "iq1_s": (256, 50), "iq1_m": (256, 56), "iq2_xxs": (256, 66), "iq2_xs": (256, 74), "iq2_s": (256, 82),
    "iq3_xxs": (256, 98), "iq3_s": (256, 110),
    "tq1_0": (256, 54), "tq2_0": (256, 66), "mxfp4": (32, 17), "nvfp4": (64, 36),
}
FLOATS = ("f32", "f16", "bf16")
FORMATS = FLOATS + tuple(QUANT_SIZES)
KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
STORAGE_DTYPE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, **{f: np.uint8 for f in QUANT_SIZES}}


def block_size(fmt: str) -> int:
    """Weights per block (1 for the float formats): a row's length must be a multiple of it."""
    return QUANT_SIZES[fmt][0] if fmt in QUANT_SIZES else 1


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes of one stored row of `cols` weights (cols a multiple of block_size(fmt))."""
    if fmt in QUANT_SIZES:
        block, size = QUANT_SIZES[fmt]
        return cols // block * size
    return cols * np.dtype(STORAGE_DTYPE[fmt]).itemsize
