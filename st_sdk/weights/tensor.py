"""WeightTensor: one stored tensor as it lies in its file (memory-mapped), in any supported format.

Formats and their `data` layout (numpy order, last axis is the contiguous one):
  f32  float32 [*shape]        f16  float16 [*shape]        bf16  uint16 [*shape] (raw bfloat16 bits)
  q8_0 uint8 [*shape[:-1], shape[-1] // 32 * 34]   ggml blocks of 32: f16 scale + 32 int8
  q4_0 uint8 [*shape[:-1], shape[-1] // 32 * 18]   ggml blocks of 32: f16 scale + 16 bytes of nibbles
Quantised tensors stay quantised; `numpy()` dequantises a copy on demand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import WeightError

FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
STORAGE_DTYPE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "q8_0": np.uint8, "q4_0": np.uint8}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def storage_shape(fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if fmt in BLOCK_BYTES:
        if shape[-1] % BLOCK:
            raise WeightError(f"{fmt} needs the last dimension to be a multiple of {BLOCK}, got shape {shape}")
        return (*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES[fmt])
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


def dequantize(fmt: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if fmt == "f32":
        return np.asarray(data, dtype=np.float32)
    if fmt == "f16":
        return np.asarray(data).astype(np.float32)
    if fmt == "bf16":
        return bf16_to_f32(data)
    nb = BLOCK_BYTES[fmt]
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, nb)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if fmt == "q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
    else:
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (q * scale).reshape(shape)


def quantize(fmt: str, x: np.ndarray) -> np.ndarray:
    """float32 -> storage array of `fmt` (ggml's reference rounding for q8_0/q4_0)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fmt == "f32":
        return x
    if fmt == "f16":
        return x.astype(np.float16)
    if fmt == "bf16":
        return f32_to_bf16(x)
    if fmt not in BLOCK_BYTES:
        raise WeightError(f"cannot quantise to {fmt!r}; supported: {', '.join(FORMATS)}")
    import gguf

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[fmt]
    return gguf.quants.quantize(x, qtype)
