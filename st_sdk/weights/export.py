"""Write models: a stream of (HF name, float32 array) into an HF directory and/or a GGUF file in one
pass, tensor by tensor, with a progress bar. `st-sdk synth` and `st-sdk quantize` both end here."""
from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..config import ModelConfig
from ..errors import InputError
from .layout import gguf_shapes, hf_shapes, hf_to_gguf, storage_format
from .mixes import MIXES, tensor_types
from .tensor import QUANTIZABLE, quantize

HF_FORMATS = ("f32", "f16", "bf16")
#: what a GGUF can be written as: llama.cpp's mixes (q4_k_m...) and, pure, every type st-sdk quantises
GGUF_FORMATS = tuple(MIXES) + tuple(f for f in QUANTIZABLE if f not in MIXES)


def hf_specs(cfg: ModelConfig, fmt: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (storage_format(n, s, fmt), s) for n, s in hf_shapes(cfg).items()}


def gguf_specs(cfg: ModelConfig, fmt: str, pure: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (stored type, shape): a mix's per-tensor types (llama.cpp's rules), or `fmt` for
    every matrix when it is a plain type or `pure`."""
    shapes = gguf_shapes(cfg)
    if fmt not in MIXES:
        return {n: (storage_format(n, s, fmt), s) for n, s in shapes.items()}
    types = tensor_types(cfg, fmt, pure)
    unwritable = sorted({t for t in types.values() if t not in QUANTIZABLE})
    if unwritable:
        raise InputError(f"{fmt}: st-sdk cannot quantise to {', '.join(unwritable)} (the types this mix "
                         f"uses); write it with llama.cpp's llama-quantize, or choose one of "
                         f"{', '.join(m for m in MIXES if m not in ('iq4_nl', 'iq4_xs'))}")
    return {n: (types[n], s) for n, s in shapes.items()}


def model_tensors(mf) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) of an opened ModelFile, one tensor (or one expert) at a time."""
    if mf.kind == "hf":
        for name in hf_shapes(mf.config):
            yield name, mf.get(name).numpy()
        return
    stacked: dict[str, Any] = {}
    for name, (gname, e) in hf_to_gguf(mf.config).items():
        if e is None:
            yield name, mf.get(gname).numpy()
        else:
            t = stacked.get(gname) or stacked.setdefault(gname, mf.get(gname))
            yield name, t.expert(e).numpy()


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, leave=False)


def export(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], fmt: str = "f32",
           hf_dir: str | Path | None = None, gguf_path: str | Path | None = None, shards: int = 1,
           tokenizer: Any = None, desc: str = "writing", pure: bool = False) -> dict[str, Path]:
    """Write every tensor of `cfg` (HF names, float32) as `fmt`: a type, or for GGUF one of llama.cpp's
    mixes (q4_k_m: per-tensor types as llama-quantize chooses them; `pure`: the main type everywhere).
    Norms and router stay f32."""
    if hf_dir is not None and fmt not in HF_FORMATS:
        raise InputError(f"HF safetensors cannot hold {fmt}; use one of {', '.join(HF_FORMATS)} "
                         f"or write GGUF only")
    if fmt not in GGUF_FORMATS:
        raise InputError(f"unknown weight type {fmt!r}; choose one of {', '.join(GGUF_FORMATS)}")
    from .gguf_file import GGUFWriterStream, model_metadata
    from .hf import SafetensorsWriter

    out: dict[str, Path] = {}
    writers: list = []
    hf_w = gg_w = None
    total = 0
    if gguf_path is not None:   # validate the GGUF side before writing anything
        meta = model_metadata(cfg, fmt)
        if tokenizer is not None:
            meta.update(tokenizer.gguf_metadata(cfg.vocab_size))
        gguf_path = Path(gguf_path)
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        gg_spec = gguf_specs(cfg, fmt, pure)
    if hf_dir is not None:
        hf_dir = Path(hf_dir)
        hf_dir.mkdir(parents=True, exist_ok=True)
        hf_spec = hf_specs(cfg, fmt)
        (hf_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_hf(hf_dir)
        hf_w = SafetensorsWriter(hf_dir, hf_spec, shards)
        writers.append(hf_w)
        total += sum(hf_w.nbytes.values())
        out["hf"] = hf_dir
    if gguf_path is not None:
        gg_w = GGUFWriterStream(gguf_path, meta, gg_spec)
        writers.append(gg_w)
        total += sum(gg_w.nbytes.values())
        out["gguf"] = gguf_path
    names = hf_to_gguf(cfg)
    bar = progress_bar(total, desc)
    seen: set[str] = set()

    def encode(name: str, x: np.ndarray) -> list:
        """(writer, write arguments) for each file; the same storage for both when the formats agree."""
        cache: dict[str, np.ndarray] = {}

        def stored(f: str) -> np.ndarray:
            if f not in cache:
                cache[f] = quantize(f, x)
            return cache[f]

        jobs = []
        if hf_w is not None:
            jobs.append((hf_w, (name, stored(hf_spec[name][0]))))
        if gg_w is not None:
            gname, e = names[name]
            jobs.append((gg_w, (gname, e, stored(gg_spec[gname][0]))))
        return jobs

    # quantising (the k-quants' scale search above all) runs on every core; writes stay on this thread
    workers = max(1, min(8, os.cpu_count() or 1))
    pending: deque = deque()

    def write_oldest() -> None:
        for w, a in pending.popleft().result():
            bar.update(w.write(*a))

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="st-sdk-quantize") as pool:
            for name, x in tensors:
                seen.add(name)
                pending.append(pool.submit(encode, name, x))
                while len(pending) > 2 * workers:   # bounded: a few tensors in flight
                    write_oldest()
            while pending:
                write_oldest()
    finally:
        for f in pending:
            f.cancel()
        bar.close()
        for w in writers:
            w.close()
    missing = [n for n in names if n not in seen]
    if missing:   # a short stream would leave zero-filled tensors behind
        for p in out.values():
            if p.is_file():
                p.unlink()
        raise InputError(f"export: {len(missing)} tensor(s) were never written, e.g. {missing[0]}")
    return out
