"""`st_sdk.load(path, ...)`: open a model file, optionally convert its weights, bind a backend."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError

QUANTIZE_TO = ("q8_0", "q4_0", "f16", "bf16", "f32")


def load(path: str | Path, backend: str | Sequence[str] | Any = "auto", dtype: str | None = None,
         n_threads: int | None = None, strict: bool = False, tune: bool = False,
         quantize: str | None = None, file: str | None = None, **kw):
    """Load a SmallThinker model from an HF directory or a `.gguf` file (contract), or a Hugging Face
    Hub repository name ("owner/repo", with file="...gguf" for one file of a GGUF repository; see
    st_sdk.hub: the local cache first, then a download when a network is there).

    quantize: convert the matrices in memory at load ('q8_0', 'q4_0', 'f16', 'bf16', 'f32');
    norms and the router stay f32. Other keyword arguments go to `st_sdk.model.build_model`
    (max_memory, context, prefetch: the memory-budget mode).
    """
    from .model import build_model
    from .weights import open_model

    if quantize is not None and quantize not in QUANTIZE_TO:
        raise InputError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_TO)}")
    from .hub import resolve

    mf = open_model(resolve(path, file))
    params = mf.params()
    if quantize is not None:
        params = convert_params(params, quantize)
    return build_model(mf.config, params, backend=backend, dtype=dtype, n_threads=n_threads, strict=strict,
                       tokenizer=mf.tokenizer, path=str(mf.path), weight_format=weight_format(params),
                       tune=tune, **kw)


def weight_format(params) -> str:
    """The dominant stored format (by bytes) of the linear and expert weights."""
    c: Counter = Counter()
    for lp in params.layers:
        for f in ("wq", "wk", "wv", "wo", "gate", "up", "down"):
            t = getattr(lp, f).raw
            c[t.fmt] += t.nbytes
    return c.most_common(1)[0][0] if c else "f32"


def convert_tensor(t, fmt: str):
    """A WeightTensor re-stored as `fmt` (per expert for stacked tensors; norms/router keep f32)."""
    from .weights.layout import storage_format
    from .weights.tensor import WeightTensor, quantize

    target = storage_format(t.name, t.shape, fmt)
    if target == t.fmt:
        return t
    if t.parts is not None or len(t.shape) == 3:
        parts = [convert_tensor(t.expert(e), fmt) for e in range(t.shape[0])]
        return WeightTensor.stack(t.name, parts, t.source)
    return WeightTensor(t.name, target, t.shape, quantize(target, t.numpy()), t.source)


def convert_params(params, fmt: str):
    from .backend import LayerParams, ModelParams, Param

    def conv(p: Param, name_hint: str) -> Param:
        t = p.raw
        if name_hint == "router":   # routers keep full precision whatever they are called
            return p
        return Param(convert_tensor(t, fmt))

    embed = conv(params.embed, "embed")
    head = embed if params.head is params.embed else conv(params.head, "head")
    layers = [LayerParams(**{f: conv(getattr(lp, f), f) for f in lp.__dataclass_fields__}) for lp in params.layers]
    return ModelParams(embed=embed, layers=layers, norm=params.norm, head=head)
