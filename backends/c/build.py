"""cffi build of the C kernels (API mode): `setup.py` compiles it at install time through
`cffi_modules`; `python -m st_sdk_backends.c.build` rebuilds it in place for development.

No -march=native: st_variants.c compiles each hot kernel for generic, AVX2 and AVX-512 itself (GCC
target pragmas) and st_kernels.c picks one at run time, so the built module runs on any CPU of its
architecture.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

MODULE = "st_sdk_backends.c._st_kernels"
CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
SOURCES = ["st_kernels.c", "st_variants.c", "st_formats.c", "st_quantize.c", "st_attention.c"]
DEPENDS = ["st_kernels.h", "st_internal.h", "st_simd_impl.h", "st_kquant_impl.h", "st_repack_impl.h",
           "st_sparse_impl.h", "st_attention.h", "st_attention_impl.h"]
CFLAGS = ["-O3", "-std=gnu11", "-fno-math-errno", "-pthread"]


def cdef_text() -> str:
    """The header minus preprocessor lines: one source of truth for C and cffi."""
    lines = (CSRC / "st_kernels.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _relpath(p: Path) -> str:
    # setuptools wants sources relative to setup.py when it builds from the project root
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def make_ffi(module: str = MODULE, extra_cflags: list[str] | None = None, extra_ldflags: list[str] | None = None,
             absolute: bool = False) -> FFI:
    _rel = str if absolute else _relpath
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(module, '#include "st_kernels.h"',
                   sources=[_rel(CSRC / s) for s in SOURCES], depends=[_rel(CSRC / d) for d in DEPENDS],
                   include_dirs=[_rel(CSRC)], extra_compile_args=CFLAGS + list(extra_cflags or []),
                   extra_link_args=["-pthread"] + list(extra_ldflags or []), libraries=["m"])
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":   # in-place development build next to this file
    import glob
    import shutil

    pkg = Path(__file__).resolve().parent
    tmp = pkg.parent.parent / "build" / "cffi"
    built = make_ffi(absolute=True).compile(tmpdir=str(tmp), verbose="-v" in sys.argv)
    for old in glob.glob(str(pkg / "_st_kernels*.so")):
        os.remove(old)
    # the name `pip install -e .` gives it, so a later install replaces it instead of being shadowed
    shutil.copy(built, pkg / "_st_kernels.abi3.so")
    print("built", pkg / "_st_kernels.abi3.so")
