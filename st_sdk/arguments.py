"""Checks of the arguments users pass to `load`, `generate`/`chat` and `logits`: every bad value is an
`InputError` naming the argument, and a name another library uses (`max_tokens`, `n_ctx`,
`num_threads`, ...) gets a "did you mean"."""
from __future__ import annotations

import difflib
import os
from typing import Any, Iterable

import numpy as np

from .errors import InputError

#: compute dtypes a backend may be asked for (the torch and jax backends honour them; numpy and c
#: always compute in float32) and the spellings accepted for them
DTYPES = ("float32", "bfloat16")
DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16"}

#: other libraries' names for st-sdk's arguments (llama-cpp-python, transformers, vLLM, Ollama, ...)
LOAD_SYNONYMS = {
    "n_ctx": "context", "ctx": "context", "context_length": "context", "max_context": "context",
    "max_seq_len": "context", "max_model_len": "context", "num_ctx": "context", "n_ctx_train": "context",
    "num_threads": "n_threads", "threads": "n_threads", "n_thread": "n_threads", "nthreads": "n_threads",
    "torch_dtype": "dtype", "precision": "dtype", "compute_dtype": "dtype",
    "device": "backend", "backends": "backend", "provider": "backend",
    "quantization": "quantize", "quant": "quantize", "load_in_8bit": "quantize", "load_in_4bit": "quantize",
    "memory_limit": "max_memory", "max_mem": "max_memory", "memory": "max_memory", "budget": "max_memory",
    "model_path": "path", "model": "path",
}
GENERATE_SYNONYMS = {
    "max_tokens": "max_new_tokens", "max_length": "max_new_tokens", "n_predict": "max_new_tokens",
    "num_predict": "max_new_tokens", "max_gen_len": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
    "n_tokens": "max_new_tokens", "new_tokens": "max_new_tokens", "max_new": "max_new_tokens",
    "stop_sequences": "stop", "stop_words": "stop", "stop_strings": "stop", "eos": "stop",
    "random_seed": "seed", "rng_seed": "seed",
    "repeat_penalty": "repetition_penalty", "repetition": "repetition_penalty",
    "temp": "temperature", "topk": "top_k", "topp": "top_p", "minp": "min_p",
    "streaming": "stream", "return_logprobs": "logprobs", "top_logprobs": "logprobs",
    "stop_event": "cancel", "cancel_event": "cancel",
}


def unknown_argument(where: str, name: str, known: Iterable[str], synonyms: dict[str, str]) -> InputError:
    """The error for an argument `where` does not take, with the closest name it does take."""
    known = list(known)
    hint = synonyms.get(name) or synonyms.get(name.lower())
    if hint is None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = close[0] if close else None
    did = f"; did you mean {hint}=?" if hint else ""
    return InputError(f"{where}: unknown argument {name!r}{did} (it takes {', '.join(known)})")


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def positive_int(value: Any, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def model_path(path: Any) -> str | os.PathLike:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path: expected the path of a .gguf file or an HF directory (str or Path), "
                         f"got {type(path).__name__}")
    if isinstance(path, str) and not path.strip():
        raise InputError("path: empty path")
    return path


def backend_spec(spec: Any, n_threads: int | None, dtype: str | None):
    """A name, a comma priority list, a list of names or Backend instances, "auto" (or None), or a
    Backend instance (a Backend subclass is instantiated with n_threads and dtype)."""
    from .backend import Backend

    if spec is None:
        return "auto"
    if isinstance(spec, type) and issubclass(spec, Backend):
        try:
            return spec(n_threads=n_threads, dtype=dtype)
        except TypeError as e:
            raise InputError(f"backend: cannot instantiate {spec.__name__}(n_threads=..., dtype=...): {e}; "
                             "pass an instance instead") from None
    if isinstance(spec, Backend):
        return spec
    if isinstance(spec, str):
        names = [s.strip() for s in spec.split(",")]
        if not spec.strip() or not all(names):
            raise InputError(f"backend: expected 'auto', a backend name or a comma list of names, got {spec!r}")
        return spec
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("backend: empty list of backends")
        for i, s in enumerate(spec):
            if not (isinstance(s, Backend) or (isinstance(s, str) and s.strip())):
                raise InputError(f"backend[{i}]: expected a backend name or a Backend instance, got {s!r}")
        return list(spec)
    raise InputError(f"backend: expected 'auto', a backend name, a list of names or a Backend instance, "
                     f"got {type(spec).__name__} {spec!r}")


def compute_dtype(dtype: Any) -> str | None:
    if dtype is None or dtype == "auto":
        return dtype
    if not isinstance(dtype, str) or DTYPE_ALIASES.get(dtype, dtype) not in DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DTYPES)} (or None for the backend's default), "
                         f"got {dtype!r}")
    return DTYPE_ALIASES.get(dtype, dtype)


def check_load(path, backend, dtype, n_threads, strict, tune, quantize, extra: dict[str, Any]):
    """Validated (path, backend, dtype, n_threads, extra) of an `st_sdk.load` call."""
    known_extra = ("file", "max_memory", "context", "prefetch", "chunk_size", "kv_dtype", "cache_policy",
                   "expert_file")
    for name in extra:
        if name not in known_extra:
            raise unknown_argument("load", name, ("path", "backend", "dtype", "n_threads", "strict", "tune",
                                                  "quantize", *known_extra), LOAD_SYNONYMS)
    path = model_path(path)
    n_threads = positive_int(n_threads, "n_threads")
    dtype = compute_dtype(dtype)
    flag(strict, "strict")
    flag(tune, "tune")
    p = extra.get("prefetch", "auto")
    if not (isinstance(p, (bool, np.bool_)) or (isinstance(p, str) and p in ("auto", "lookahead"))):
        raise InputError(f"prefetch: expected True or False, 'auto' or 'lookahead', got {p!r}")
    if "chunk_size" in extra:
        positive_int(extra["chunk_size"], "chunk_size", allow_none=False)
    if "cache_policy" in extra:
        from .offload.cache import POLICIES

        if extra["cache_policy"] not in POLICIES:
            raise InputError(f"cache_policy: expected one of {', '.join(POLICIES)}, got {extra['cache_policy']!r}")
    if "expert_file" in extra:
        from .offload.prepared import check_mode

        check_mode(extra["expert_file"])
    if extra.get("max_memory") is not None:
        from .sizes import parse_size

        parse_size(extra["max_memory"])
    if quantize is not None and not isinstance(quantize, str):
        raise InputError(f"quantize: expected a weight format name such as 'q8_0', got {quantize!r}")
    return path, backend_spec(backend, n_threads, dtype), dtype, n_threads, extra


def token_ids(ids: Any, name: str = "ids") -> np.ndarray:
    """A 1-D array of the given token ids (not yet range-checked), or InputError."""
    if isinstance(ids, np.ndarray):
        return ids
    if isinstance(ids, (str, bytes)) or ids is None or not hasattr(ids, "__iter__"):
        kind = "text" if isinstance(ids, str) else type(ids).__name__
        raise InputError(f"{name}: expected a sequence of token ids, got {kind}"
                         + ("; encode text with model.tokenizer.encode(...) first" if isinstance(ids, str) else ""))
    try:
        return np.asarray(list(ids))
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: expected a sequence of token ids ({e})") from None


def text(value: Any, name: str) -> str:
    """`value` if it is a str that UTF-8 can encode (no lone surrogates), else InputError."""
    if not isinstance(value, str):
        raise InputError(f"{name}: expected text (str), got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name}: not valid Unicode text: {e.reason} at index {e.start} "
                         f"({value[e.start:e.end]!r})") from None
    return value
