"""`st_sdk.load(path, ...)`: open a model file, optionally convert its weights, bind a backend."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError

QUANTIZE_TO = ("q8_0", "q4_0", "f16", "bf16", "f32")


def load(path: str | Path, backend: str | Sequence[str] | Any = "auto", dtype: str | None = None,
         n_threads: int | None = None, strict: bool = False, tune: bool = False,
         quantize: str | None = None, **kw):
    """Load a SmallThinker model from an HF directory or a `.gguf` file (contract).

    quantize: convert the matrices in memory at load ('q8_0', 'q4_0', 'f16', 'bf16', 'f32');
    norms and the router stay f32. Other keyword arguments go to `st_sdk.model.build_model`
    (max_memory, context, prefetch: the memory-budget mode).
    """
    from .arguments import check_context, check_load
    from .model import build_model
    from .weights import open_model

    path, backend, dtype, n_threads, kw = check_load(path, backend, dtype, n_threads, strict, tune, quantize, kw)
    if quantize is not None and quantize not in QUANTIZE_TO:
        raise InputError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_TO)}")
    mf = open_model(path)
    check_context(kw.get("context"), mf.config)
    params = mf.params()
    if quantize is not None:
        params = convert_params(params, quantize)
    model = build_model(mf.config, params, backend=backend, dtype=dtype, n_threads=n_threads, strict=strict,
                        tokenizer=mf.tokenizer, path=str(mf.path), weight_format=weight_format(params),
                        tune=tune, **kw)
    model.files = mf.watch
    return model


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
