"""Synthetic model files for benchmarks: written once into the cache directory and reused."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from .. import synth
from ..environment import cache_dir
from ..errors import InputError

log = logging.getLogger("st_sdk")


def models_dir() -> Path:
    return cache_dir() / "models"


#: formats `synth_gguf` makes by quantising the F16 file with llama.cpp's mixes (as published files are)
QUANTIZED_FROM_F16 = ("q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                      "q6_k", "iq4_nl", "iq4_xs")


def synth_gguf(preset: str, fmt: str, seed: int = 0) -> Path:
    """A synthetic GGUF of `preset` in `fmt`, written once into the cache directory and reused
    (written under a temporary name, then renamed, so concurrent runs never see half a file).
    The 32-block types and floats are written directly (every matrix `fmt`); the k-quant and IQ4 mixes
    (q4_k_m, q6_k, ...) are quantised from the F16 file, by llama.cpp's quantiser when installed, else
    st-sdk's."""
    target = models_dir() / f"{preset}-{fmt}-seed{seed}.gguf"
    if target.exists():
        return target
    source = synth_gguf(preset, "f16", seed) if fmt in QUANTIZED_FROM_F16 else None
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):   # a second writer waits, then reuses
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".writing-") as tmp:
            if source is not None:   # what people download: llama.cpp's mix of the F16 file
                from ..weights.requantize import quantize_gguf

                used = quantize_gguf(source, Path(tmp) / target.name, fmt, quantizer="auto")
                log.warning("quantised %s to %s with %s's quantiser into %s (once)", source, fmt, used, target)
                os.replace(Path(tmp) / target.name, target)
                return target
            log.warning("synthesising %s %s into %s (once)", preset, fmt, target)
            out = synth.write_model(tmp, preset=preset, formats=("gguf",), dtype=fmt, seed=seed)
            os.replace(_find_gguf(out, tmp), target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:   # Windows: no lock; the rename still keeps half-written files invisible
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_gguf(out, folder) -> Path:
    if isinstance(out, dict) and out.get("gguf"):   # write_model returns {"gguf": path, ...}
        return Path(out["gguf"])
    found = sorted(Path(folder).rglob("*.gguf"))
    if not found:
        raise InputError(f"synth.write_model wrote no .gguf file into {folder}")
    return found[0]
