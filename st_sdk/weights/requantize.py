"""Re-quantise a model file into a GGUF of one of llama.cpp's mixes, with st-sdk's own quantiser or with
llama.cpp's (`llama_model_quantize` from llama-cpp-python: what llama-quantize and the published GGUF
repositories use). Both write the same per-tensor types; their rounding differs (llama.cpp's k-quant
search is st-sdk's C quantiser's, its q4_0/q8_0 rounding is gguf-py's)."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

QUANTIZERS = ("st-sdk", "llama.cpp")


def llama_cpp_missing() -> str | None:
    """Why llama.cpp's quantiser cannot be used here (None when it can)."""
    from importlib.util import find_spec

    return None if find_spec("llama_cpp") else "llama-cpp-python is not installed (pip install llama-cpp-python)"


def quantize_gguf(src: str | Path, dst: str | Path, mix: str, quantizer: str = "st-sdk", pure: bool = False,
                  threads: int | None = None) -> str:
    """Write `dst` (.gguf) from `src` (HF directory or GGUF) as `mix` (one of llama.cpp's mixes, or a type:
    every matrix that type); quantizer 'st-sdk', 'llama.cpp' or 'auto' (llama.cpp's when installed and
    `src` is a GGUF, else st-sdk's). The file appears complete or not at all (written as dst.part, then
    renamed). Returns the quantiser used."""
    from .export import GGUF_FORMATS
    from .gguf_file import FILE_TYPES
    from .mixes import MIXES

    src, dst = Path(src), Path(dst)
    if mix not in GGUF_FORMATS:
        raise InputError(f"unknown type {mix!r}; choose one of {', '.join(GGUF_FORMATS)}")
    if quantizer == "auto":
        quantizer = "llama.cpp" if llama_cpp_missing() is None and src.suffix == ".gguf" else "st-sdk"
    if quantizer not in QUANTIZERS:
        raise InputError(f"quantizer {quantizer!r}: choose one of {', '.join(QUANTIZERS)} or 'auto'")
    tmp = dst.with_name(dst.name + ".part")
    try:
        if quantizer == "llama.cpp":
            _llama_cpp(src, tmp, FILE_TYPES[mix], pure or mix not in MIXES, threads)
        else:
            _st_sdk(src, tmp, mix, pure)
        tmp.replace(dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return quantizer


def _st_sdk(src: Path, dst: Path, mix: str, pure: bool) -> None:
    from . import open_model
    from .export import export, model_tensors

    mf = open_model(src)
    export(mf.config, model_tensors(mf), mix, gguf_path=dst, tokenizer=mf.tokenizer, desc=f"quantize {mix}",
           pure=pure)


def _llama_cpp(src: Path, dst: Path, ftype: int, pure: bool, threads: int | None) -> None:
    why = llama_cpp_missing()
    if why:
        raise InputError(f"the llama.cpp quantiser is not available: {why}")
    if src.suffix != ".gguf":
        raise InputError(f"{src}: llama.cpp quantises GGUF files; convert it first (st-sdk quantize IN OUT.gguf --type f16)")
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = bool(pure)
    params.nthread = int(threads or 0)   # 0: every core
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise InputError(f"{src}: llama.cpp's llama_model_quantize failed (return code {rc}; its log is above)")
