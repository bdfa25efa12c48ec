"""WeightTensor: one stored tensor as it lies in its file (memory-mapped), in any supported format.

Formats are gguf's type names in lower case. Their `data` layout (numpy order, last axis contiguous):
  f32  float32 [*shape]        f16  float16 [*shape]        bf16  uint16 [*shape] (raw bfloat16 bits)
  every block type (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, iq4_nl, iq4_xs, the iq1/iq2/iq3 types,
  tq1_0, tq2_0, mxfp4, nvfp4): uint8 [*shape[:-1], shape[-1] // block * type_size], ggml's blocks
  exactly as in a GGUF file (QUANT_SIZES holds gguf.GGML_QUANT_SIZES: block, type_size).
Quantised tensors stay quantised; `numpy()` dequantises a copy on demand through gguf-py's
`gguf.quants.dequantize` (the reference for every layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import WeightError
from .formats import FLOATS, FORMATS, KQUANTS, QUANT_SIZES, STORAGE_DTYPE, block_size, row_bytes  # noqa: F401 (re-exported)

#: the 32-weight block formats of the original kernels (q8_0, q4_0): kept for their callers
BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


#: a type whose blocks do not divide a row's length -> what llama.cpp stores instead (tensor_type_fallback)
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl",
            "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
            "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "tq1_0": "q4_0", "tq2_0": "q4_0"}


def fallback(fmt: str, cols: int) -> str:
    """The type a row of `cols` weights is stored as when `fmt`'s blocks do not divide it: llama.cpp's
    fallback (q4_k -> q5_0, q6_k -> q8_0, ...), f16 when that does not fit either."""
    if cols % block_size(fmt) == 0:
        return fmt
    fmt = FALLBACK.get(fmt, fmt)
    return fmt if cols % block_size(fmt) == 0 else "f16"


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def storage_shape(fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if fmt in QUANT_SIZES:
        block, size = QUANT_SIZES[fmt]
        if not shape or shape[-1] % block:
            raise WeightError(f"{fmt} needs the last dimension to be a multiple of {block}, got shape {shape}")
        return (*shape[:-1], shape[-1] // block * size)
    return tuple(shape)


@dataclass
class WeightTensor:
    name: str
    fmt: str
    shape: tuple[int, ...]
    data: np.ndarray
    source: str = ""
    parts: list["WeightTensor"] | None = field(default=None, repr=False)  # stacked view over per-expert tensors

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise WeightError(f"{self.source}: tensor '{self.name}' has unsupported type {self.fmt!r}; "
                              f"supported: {', '.join(FORMATS)}")
        if self.parts is None:
            want = storage_shape(self.fmt, self.shape)
            if tuple(self.data.shape) != want or self.data.dtype != STORAGE_DTYPE[self.fmt]:
                raise WeightError(f"{self.source}: tensor '{self.name}' storage {self.data.dtype}{list(self.data.shape)}"
                                  f" does not match {self.fmt}{list(self.shape)}")

    @classmethod
    def stack(cls, name: str, parts: list["WeightTensor"], source: str = "") -> "WeightTensor":
        """A 3-D [E, ...] tensor over per-expert 2-D tensors, without copying them."""
        fmts = {p.fmt for p in parts}
        shapes = {p.shape for p in parts}
        if len(fmts) != 1 or len(shapes) != 1:
            raise WeightError(f"{source}: experts of '{name}' differ in type or shape: {sorted(fmts)} {sorted(shapes)}")
        shape = (len(parts), *parts[0].shape)
        return cls(name, parts[0].fmt, shape, np.empty(0, np.uint8), source, parts=list(parts))

    @property
    def nbytes(self) -> int:
        if self.parts is not None:
            return sum(p.nbytes for p in self.parts)
        return int(self.data.nbytes)

    def expert(self, e: int) -> "WeightTensor":
        """Slice e of a stacked 3-D expert tensor, as a 2-D tensor (a view, no copy)."""
        if self.parts is not None:
            return self.parts[e]
        return WeightTensor(f"{self.name}[{e}]", self.fmt, self.shape[1:], self.data[e], self.source)

    def storage(self) -> np.ndarray:
        """The raw storage as one array (stacks per-expert parts: a copy only in that case)."""
        if self.parts is not None:
            return np.stack([p.data for p in self.parts])
        return self.data

    def numpy(self) -> np.ndarray:
        """Dequantised float32 copy (or view for f32)."""
        if self.parts is not None:
            return np.stack([p.numpy() for p in self.parts])
        return dequantize(self.fmt, self.data, self.shape)


def ggml_type(fmt: str):
    """gguf.GGMLQuantizationType of a format (a WeightError when this gguf-py lacks it)."""
    import gguf

    try:
        return gguf.GGMLQuantizationType[fmt.upper()]
    except KeyError:
        raise WeightError(f"type {fmt!r} needs a newer gguf-py (installed: gguf "
                          f"{_gguf_version()}); pip install -U gguf") from None


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def dequantize(fmt: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Storage of `fmt` -> float32 array of `shape`: the float formats directly, every block format
    through gguf-py's `gguf.quants.dequantize`."""
    if fmt == "f32":
        return np.asarray(data, dtype=np.float32)
    if fmt == "f16":
        return np.asarray(data).astype(np.float32)
    if fmt == "bf16":
        return bf16_to_f32(data)
    if fmt not in QUANT_SIZES:
        raise WeightError(f"cannot dequantise {fmt!r}; supported: {', '.join(FORMATS)}")
    import gguf

    out = gguf.quants.dequantize(np.asarray(data, dtype=np.uint8), ggml_type(fmt))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def quantize(fmt: str, x: np.ndarray) -> np.ndarray:
    """float32 [..., cols] -> storage array of `fmt`: gguf-py's `gguf.quants.quantize` (ggml's reference
    rounding) where it implements the type (q4_0, q4_1, q5_0, q5_1, q8_0, tq1_0, tq2_0, mxfp4), the
    C backend's quantiser (llama.cpp's search for the best scales) for the k-quants q2_k..q6_k."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fmt == "f32":
        return x
    if fmt == "f16":
        return x.astype(np.float16)
    if fmt == "bf16":
        return f32_to_bf16(x)
    if fmt not in QUANT_SIZES:
        raise WeightError(f"cannot quantise to {fmt!r}; supported: {', '.join(FORMATS)}")
    storage_shape(fmt, x.shape)   # checks the row length
    if fmt in KQUANTS:
        return _quantize_c(fmt, x)
    import gguf

    try:
        return gguf.quants.quantize(x, ggml_type(fmt))
    except NotImplementedError:
        raise WeightError(f"cannot quantise to {fmt!r}: gguf-py has no quantiser for it and st-sdk has none "
                          f"either; st-sdk quantises to {', '.join(QUANTIZABLE)} "
                          "(llama.cpp's llama-quantize writes every type)") from None


#: the formats `quantize` writes (k-quants need the C backend's extension)
QUANTIZABLE = FLOATS + ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1") + KQUANTS + ("tq1_0", "tq2_0", "mxfp4")


def _quantize_c(fmt: str, x: np.ndarray) -> np.ndarray:
    try:
        from st_sdk_backends.c import ops
        quantize_rows = ops.quantize_rows
    except (ImportError, AttributeError) as e:
        raise WeightError(f"quantising to {fmt} needs the C backend's compiled extension, which is not "
                          f"available ({type(e).__name__}: {e}); reinstall st-sdk with a C compiler "
                          "(pip install -e .), or write the file with llama.cpp's llama-quantize") from None
    rows = x.reshape(-1, x.shape[-1])
    return np.asarray(quantize_rows(fmt, rows), dtype=np.uint8).reshape(storage_shape(fmt, x.shape))
