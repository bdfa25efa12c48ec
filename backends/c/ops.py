"""The C backend's ops: thin wrappers that validate every argument in Python (shape, dtype,
contiguity, buffer size) before handing raw pointers to the kernels, so bad input raises
`InputError`/`BackendError` and never reaches C unchecked. The C side re-checks sizes it can cheaply.

Weights are described to C without copying: a `CMat` points into the stored array (the GGUF memory
map itself for GGUF files); `CExperts` holds one pointer per expert (a 3-D GGUF tensor's slices or an
HF checkpoint's per-expert tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from st_sdk.errors import BackendError, InputError
from st_sdk.weights.mapping import in_file_map, release_map
from st_sdk.weights.formats import KQUANTS, STORAGE_DTYPE, block_size
from st_sdk.weights.formats import row_bytes as _row_bytes

#: stored formats the kernels run as they lie in the file, and their codes (csrc/st_kernels.h)
FMT_CODE = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "q4_1": 7, "q5_0": 8, "q5_1": 9, "iq4_nl": 10,
            "q2_k": 11, "q3_k": 12, "q4_k": 13, "q5_k": 14, "q6_k": 15, "iq4_xs": 16}
#: the kernels' activation blocks: {float d, s; int8 qs[32]} and Q8_K {float d; int8 qs[256]; int16 bsums[16]}
Q8_BLOCK = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
Q8K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
VARIANTS = {"generic": 0, "avx2": 1, "avx512": 2, "neon": 3}
_ERRORS = {-1: (InputError, "invalid argument (shape, size or pointer)"), -2: (BackendError, "out of memory"),
           -3: (InputError, "KV cache does not fit (capacity or window mismatch)"),
           -4: (InputError, "token or expert id out of range"), -5: (BackendError, "variant not supported")}

_loaded: tuple | None = None
_load_error: str | None = None


def ffi_lib():
    """(ffi, lib) of the compiled module; raises BackendError naming what is missing."""
    global _loaded, _load_error
    if _loaded is None:
        if _load_error is not None:
            raise BackendError(_load_error)
        try:
            _st_kernels = _import_module()
        except ImportError as e:
            _load_error = (f"the compiled module st_sdk_backends.c._st_kernels is missing ({e}); "
                           "reinstall with a C compiler present: pip install -e .")
            raise BackendError(_load_error) from None
        _loaded = (_st_kernels.ffi, _st_kernels.lib)
    return _loaded


def _import_module():
    """The compiled module; ST_C_KERNELS_PATH points at another build of it (the sanitizer test's)."""
    import os

    path = os.environ.get("ST_C_KERNELS_PATH")
    if not path:
        from . import _st_kernels

        return _st_kernels
    import importlib.util

    spec = importlib.util.spec_from_file_location(__package__ + "._st_kernels", path)
    if spec is None or not os.path.exists(path):
        raise ImportError(f"ST_C_KERNELS_PATH={path!r} is not a loadable module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sparse_counters() -> np.ndarray:
    """csrc st_sparse_stats as int64 [layers kept, ST_SPARSE_STATS] (csrc keeps up to 1024 layers)."""
    ffi, lib = ffi_lib()
    st = np.zeros((1024, lib.ST_SPARSE_STATS), np.int64)
    kept = lib.st_sparse_stats(ffi.cast("int64_t *", st.ctypes.data), st.shape[0])
    return st[:kept]


def stage_clocks() -> np.ndarray:
    """csrc st_stage_seconds as float64 [stages], in st_stage_name's order."""
    ffi, lib = ffi_lib()
    out = ffi.new("double[]", 64)
    return np.array(ffi.unpack(out, lib.st_stage_seconds(out, 64)), np.float64)


def check(rc: int, what: str) -> None:
    if rc != 0:
        cls, msg = _ERRORS.get(rc, (BackendError, f"error {rc}"))
        raise cls(f"C backend {what}: {msg}")


def row_bytes(fmt: str, cols: int) -> int:
    return _row_bytes(fmt, cols)


def _code(fmt: str, name: str) -> int:
    if fmt not in FMT_CODE:
        raise InputError(f"weight '{name}': the C kernels do not run {fmt!r} as stored "
                         f"(they run {', '.join(FMT_CODE)}); the backend converts other types at load")
    return FMT_CODE[fmt]


def _storage(arr: np.ndarray, fmt: str, rows_shape: tuple, cols: int, name: str) -> tuple[np.ndarray, int]:
    """The array as contiguous storage of exactly the expected size; (array, bytes copied)."""
    _code(fmt, name)
    if cols % block_size(fmt):
        raise InputError(f"weight '{name}': {fmt} rows need a multiple of {block_size(fmt)} columns, got {cols}")
    want = (*rows_shape, row_bytes(fmt, cols) // np.dtype(STORAGE_DTYPE[fmt]).itemsize)
    if arr.dtype != STORAGE_DTYPE[fmt] or tuple(arr.shape) != want:
        raise InputError(f"weight '{name}': storage {arr.dtype}{list(arr.shape)} does not match "
                         f"{fmt} {list(rows_shape)}x{cols}")
    if arr.flags.c_contiguous and arr.flags.aligned:
        return arr, 0
    arr = np.require(arr, requirements=("C", "A"))   # the kernels load whole elements: never misaligned
    return arr, arr.nbytes


def repacked_code(fmt: str) -> int:
    """The code of `fmt`'s 8-row repacked layout, -1 if the kernels have none."""
    if fmt not in FMT_CODE:
        return -1
    _, lib = ffi_lib()
    return int(lib.st_repacked_format(FMT_CODE[fmt]))


def _layout_code(fn: str, fmt: str) -> int:
    """lib.`fn`(code of `fmt`): the code of one of its other layouts, -1 if the kernels have none."""
    if fmt not in FMT_CODE:
        return -1
    _, lib = ffi_lib()
    return int(getattr(lib, fn)(FMT_CODE[fmt]))


def neuron_major_code(fmt: str) -> int:
    """The code of `fmt`'s neuron-major layout (sparse down projections), -1 if the kernels have none."""
    return _layout_code("st_neuron_major_format", fmt)


def row_split_code(fmt: str) -> int:
    """The code of `fmt`'s row-split layout (sparse up projections), -1 if the kernels have none."""
    return _layout_code("st_row_split_format", fmt)


def can_neuron_major(fmt: str, rows: int) -> bool:
    return rows % 64 == 0 and neuron_major_code(fmt) >= 0


def can_row_split(fmt: str, cols: int) -> bool:
    return cols % 64 == 0 and row_split_code(fmt) >= 0


def can_repack(fmt: str, rows: int) -> bool:
    return rows % 8 == 0 and repacked_code(fmt) >= 0


@dataclass(frozen=True)
class Layout:
    """How a [rows, cols] matrix of `fmt` lies for the kernels: `name` ('file', 'repacked', 'row_split',
    'neuron_major'), its format code, the `row_bytes` the kernels step by (bytes per 8-row group when
    repacked) and its size; `convert` writes it from the file layout (csrc/st_kernels.h)."""
    name: str
    fmt: str
    rows: int
    cols: int
    code: int
    row_bytes: int
    nbytes: int
    fn: str | None = None   # the C function that converts from the file layout (same signature for all)

    def convert(self, src: np.ndarray, out: np.ndarray | None = None, arena=None) -> np.ndarray:
        """src: the matrix as stored (uint8, [rows, cols] in the file layout) -> `out` (when not given,
        taken from `arena` (st_sdk.offload.pages.Arena) or allocated; uint8 of `nbytes`). The C call
        releases the GIL, so I/O threads can convert in parallel."""
        ffi, lib = ffi_lib()
        if out is None:
            out = arena.take(self.nbytes) if arena is not None else np.empty(self.nbytes, np.uint8)
        if src.nbytes < self.rows * row_bytes(self.fmt, self.cols) or out.nbytes < self.nbytes:
            raise InputError(f"{self.name} layout of {self.fmt} [{self.rows}, {self.cols}]: buffers of {src.nbytes} "
                             f"and {out.nbytes} bytes are too small")
        if self.fn is None:
            out[:self.nbytes] = src.reshape(-1)[:self.nbytes]
            return out
        check(getattr(lib, self.fn)(FMT_CODE[self.fmt], ffi.cast("void *", src.ctypes.data), self.rows, self.cols,
                                    row_bytes(self.fmt, self.cols), ffi.cast("void *", out.ctypes.data)), self.fn)
        return out


def layout(fmt: str, rows: int, cols: int, repack_rows: bool = False, neuron_major: bool = False,
           row_split: bool = False) -> Layout:
    """The first asked-for layout this type and shape have: neuron-major (sparse down projections),
    row-split (sparse up projections: one live neuron's row read alone; where a type or width has no
    row-split kernels, the file's layout, whose rows are read one at a time too), 8 rows interleaved;
    else the file's. All are as large as the file's."""
    rb = row_bytes(fmt, cols)
    if neuron_major and can_neuron_major(fmt, rows):
        return Layout("neuron_major", fmt, rows, cols, neuron_major_code(fmt), rb, rows * rb, "st_neuron_major")
    if row_split and can_row_split(fmt, cols):
        return Layout("row_split", fmt, rows, cols, row_split_code(fmt), rb, rows * rb, "st_row_split")
    if row_split:
        return Layout("file", fmt, rows, cols, _code(fmt, f"{fmt} [{rows}, {cols}]"), rb, rows * rb)
    if repack_rows and can_repack(fmt, rows):
        _, lib = ffi_lib()
        n = int(lib.st_repacked_bytes(FMT_CODE[fmt], rows, cols))
        return Layout("repacked", fmt, rows, cols, repacked_code(fmt), n // (rows // 8), n, "st_repack")
    return Layout("file", fmt, rows, cols, _code(fmt, f"{fmt} [{rows}, {cols}]"), rb, rows * rb)


def repack(arr: np.ndarray, fmt: str, rows: int, cols: int, arena=None) -> tuple[np.ndarray, int]:
    """[rows, cols] storage -> the 8-row interleaved copy (Q8_0, Q4_0, the k-quants, IQ4_XS; same
    size; taken from `arena` when given); (copy, bytes per 8-row group)."""
    lay = layout(fmt, rows, cols, repack_rows=True)
    if lay.name != "repacked":
        raise InputError(f"cannot repack {fmt} [{rows}, {cols}] (rows must be a multiple of 8)")
    return lay.convert(arr, arena=arena), lay.row_bytes


class CMat:
    """A 2-D weight [rows, cols] as the kernels see it (st_mat): pointing into the stored array, or
    into an 8-row interleaved copy when `repack` (its bytes are counted in `repacked`; the copy comes
    from `arena` when given)."""

    def __init__(self, tensor, repack_rows: bool = False, arena=None):
        ffi, _ = ffi_lib()
        if len(tensor.shape) != 2:
            raise InputError(f"weight '{tensor.name}': expected a 2-D matrix, got shape {list(tensor.shape)}")
        rows, cols = (int(s) for s in tensor.shape)
        self.name, self.fmt, self.rows, self.cols = tensor.name, tensor.fmt, rows, cols
        self.tensor = tensor   # as stored (or as converted at load): a tied head repacks its own copy from it
        self.data, self.copied = _storage(tensor.storage(), tensor.fmt, (rows,), cols, tensor.name)
        code, rb, self.repacked = FMT_CODE[tensor.fmt], row_bytes(tensor.fmt, cols), 0
        self.released = 0
        if repack_rows and can_repack(tensor.fmt, rows):
            source = self.data
            self.data, rb = repack(source, tensor.fmt, rows, cols, arena)
            code, self.repacked, self.copied = repacked_code(tensor.fmt), self.data.nbytes, 0
            self.released = release_map(source)
        self.struct = ffi.new("st_mat *", {"data": ffi.cast("void *", self.data.ctypes.data), "rows": rows,
                                           "cols": cols, "row_bytes": rb, "fmt": code})

    def hold(self, arena=None) -> int:
        """Point at an anonymous copy (from `arena` when given) instead of a read-only file map, whose
        pages of it are dropped from the process (counted in `copied` and `released`); bytes copied."""
        if not in_file_map(self.data):
            return 0
        source = self.data
        self.data = arena.take(source.nbytes).view(source.dtype).reshape(source.shape) if arena is not None \
            else np.empty_like(source)
        self.data[...] = source
        self.struct.data = ffi_lib()[0].cast("void *", self.data.ctypes.data)
        self.copied += source.nbytes
        self.released += release_map(source)
        return source.nbytes


class CExperts:
    """Stacked experts [E, rows, cols]: one pointer per expert, no copy of GGUF or HF storage; or a
    copy: for sparse ReGLU, which reads one live neuron at a time, a down projection neuron-major
    (`neuron_major`) or an up projection row-split (`row_split`), else 8 rows interleaved
    (`repack_rows`); the first asked for that the type and shape allow (`layout` says which). A copy's
    bytes are counted in `repacked`; it comes from `arena` when given."""

    def __init__(self, tensor, repack_rows: bool = False, neuron_major: bool = False, row_split: bool = False,
                 arena=None):
        ffi, _ = ffi_lib()
        if len(tensor.shape) != 3:
            raise InputError(f"weight '{tensor.name}': expected stacked experts [E, rows, cols], "
                             f"got shape {list(tensor.shape)}")
        E, rows, cols = (int(s) for s in tensor.shape)
        self.name, self.fmt, self.n, self.rows, self.cols = tensor.name, tensor.fmt, E, rows, cols
        self.copied = 0
        if tensor.parts is not None:
            self.arrays = []
            for p in tensor.parts:
                a, c = _storage(p.data, tensor.fmt, (rows,), cols, p.name)
                self.arrays.append(a)
                self.copied += c
            ptrs = [a.ctypes.data for a in self.arrays]
        else:
            a, self.copied = _storage(tensor.data, tensor.fmt, (E, rows), cols, tensor.name)
            self.arrays = [a]
            stride = rows * row_bytes(tensor.fmt, cols)
            ptrs = [a.ctypes.data + e * stride for e in range(E)]
        lay = layout(tensor.fmt, rows, cols, repack_rows, neuron_major, row_split)
        self.layout, self.repacked, self.released = lay.name, 0, 0
        if lay.fn is not None:
            rb = row_bytes(tensor.fmt, cols)
            sources = self.arrays
            self.arrays = [lay.convert(np.frombuffer(ffi.buffer(ffi.cast("char *", p), rows * rb), np.uint8),
                                       arena=arena) for p in ptrs]
            ptrs = [a.ctypes.data for a in self.arrays]
            self.copied, self.repacked = 0, sum(a.nbytes for a in self.arrays)
            self.released = sum(release_map(a) for a in sources)
        self.ptrs = ffi.new("void *[]", [ffi.cast("void *", p) for p in ptrs])
        self.struct = ffi.new("st_experts *", {"experts": self.ptrs, "n_experts": E, "rows": rows, "cols": cols,
                                               "row_bytes": lay.row_bytes, "fmt": lay.code})


def quantize_rows(fmt: str, x) -> np.ndarray:
    """float32 [rows, cols] -> `fmt` storage uint8 [rows, cols // 256 * type_size] for the k-quants
    q2_k..q6_k, with ggml's reference quantisers (what llama.cpp's quantiser writes without an
    importance matrix). cols must be a multiple of 256."""
    if fmt not in KQUANTS:
        raise InputError(f"quantize_rows: {fmt!r} is not one of {', '.join(KQUANTS)}")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or x.shape[1] % 256:
        raise InputError(f"quantize_rows: expected float32 [rows, cols] with cols a multiple of 256, got "
                         f"{x.dtype}{list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"quantize_rows: expected floating point values, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    ffi, lib = ffi_lib()
    out = np.empty((x.shape[0], row_bytes(fmt, x.shape[1])), np.uint8)
    check(lib.st_quantize_rows(FMT_CODE[fmt], ptr(ffi, "float *", x), x.shape[0], x.shape[1],
                               ffi.cast("void *", out.ctypes.data)), f"quantize_rows {fmt}")
    return out


def quantize_act(fmt: str, x) -> np.ndarray:
    """One float32 activation row as the kernels quantise it for weights of `fmt`: Q8_BLOCK records
    (the 32-blocks) or Q8K_BLOCK records (the k-quants and iq4_xs); what kernel tests dequantise."""
    ffi, lib = ffi_lib()
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    bs = 256 if fmt in KQUANTS or fmt == "iq4_xs" else 32
    if fmt not in FMT_CODE or fmt in ("f32", "f16", "bf16") or x.size % bs:
        raise InputError(f"quantize_act: no activation blocks for {fmt!r} of {x.size} values")
    out = np.zeros(x.size // bs, Q8K_BLOCK if bs == 256 else Q8_BLOCK)
    check(lib.st_quantize_act(FMT_CODE[fmt], ptr(ffi, "float *", x), x.size, ffi.cast("void *", out.ctypes.data)),
          "quantize_act")
    return out


def f32_vector(param, n: int | None = None) -> np.ndarray:
    """A weight `Param`'s float32 vector (its prepared value when that already is one)."""
    v = param.value if isinstance(param.value, np.ndarray) and param.value.dtype == np.float32 \
        and param.value.flags.c_contiguous and param.value.flags.aligned and param.value.ndim == 1 \
        else np.require(param.raw.numpy(), np.float32, ("C", "A"))
    if v.ndim != 1 or (n is not None and v.shape[0] != n):
        raise InputError(f"weight '{param.name}': expected a vector of {n}, got shape {list(v.shape)}")
    return v


def as_mat(param) -> CMat:   # param: st_sdk.backend.Param
    return param.value if isinstance(param.value, CMat) else CMat(param.raw)


def as_experts(param) -> CExperts:
    return param.value if isinstance(param.value, CExperts) else CExperts(param.raw)


def activations(x, cols: int, name: str) -> np.ndarray:
    """x as a C-contiguous float32 [T, cols] array (T >= 1), or InputError."""
    if not hasattr(x, "shape"):
        raise InputError(f"{name}: expected an array, got {type(x).__name__}")
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] != cols or x.size == 0:
        raise InputError(f"{name}: expected shape [T, {cols}], got {list(x.shape)}")
    if x.dtype.kind != "f":   # floating point (the kind test: np.issubdtype costs microseconds a layer)
        raise InputError(f"{name}: expected floating point activations, got {x.dtype}")
    return np.ascontiguousarray(x.reshape(-1, cols), dtype=np.float32)


def int64_vector(a, n: int, name: str, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or a.shape[0] != n or a.dtype.kind not in "iu":   # signed or unsigned integers
        raise InputError(f"{name}: expected {n} integers, got {a.dtype}{list(a.shape)}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if (lo is not None and n and a.min() < lo) or (hi is not None and n and a.max() >= hi):
        raise InputError(f"{name}: values must lie in [{lo}, {hi}), got min {a.min()} max {a.max()}")
    return a


_ARRAY_TYPES: dict[str, str] = {}


def ptr(ffi, ctype: str, a: np.ndarray):
    """A C-contiguous array as a `ctype` ("float *") argument: a cdata over its buffer (a tenth of the
    cost of casting `a.ctypes.data`, called several times a layer; ValueError if not contiguous)."""
    array = _ARRAY_TYPES.get(ctype)
    if array is None:
        array = _ARRAY_TYPES[ctype] = ctype.replace("*", "[]")
    return ffi.from_buffer(array, a)
