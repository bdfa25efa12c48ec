"""`st_sdk.load(path, ...)`: open a model file, optionally convert its weights, bind a backend."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError


def load(path: str | Path, backend: str | Sequence[str] | Any = "auto", dtype: str | None = None,
         n_threads: int | None = None, strict: bool = False, tune: bool = False,
         quantize: str | None = None, **kw):
    """Load a SmallThinker model from an HF directory or a `.gguf` file (contract).

    quantize: convert the matrices in memory at load: a type ('q8_0', 'q4_0', 'q4_k', 'q6_k', 'f16',
    ...; every matrix that type) or one of llama.cpp's mixes ('q4_k_m', 'q5_k_m', 'q3_k_m', ...: each
    tensor the type llama-quantize gives it); norms and the router stay f32. Other keyword arguments go
    to `st_sdk.model.build_model`: kv_dtype ('f16', 'q8_0', 'f32': how the KV cache stores keys and
    values), max_memory, context, prefetch (the memory-budget mode).
    """
    from .model import build_model
    from .weights import open_model
    from .weights.export import GGUF_FORMATS

    if quantize is not None and quantize not in GGUF_FORMATS:
        raise InputError(f"quantize={quantize!r}: choose one of {', '.join(GGUF_FORMATS)}")
    mf = open_model(path)
    params = mf.params()
    if quantize is not None:
        params = convert_params(params, quantize, mf.config)
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


def convert_params(params, fmt: str, config=None):
    """ModelParams with the matrices re-stored as `fmt`: a type, or a llama.cpp mix (needs `config`:
    the per-tensor types depend on the layer count and shapes)."""
    from .backend import LayerParams, ModelParams, Param
    from .weights.layout import EXPERT_NAMES, LAYER_NAMES
    from .weights.mixes import MIXES, tensor_types

    types = tensor_types(config, fmt) if fmt in MIXES else None
    gguf_name = {field: gname for gname, field in list(LAYER_NAMES.values()) + list(EXPERT_NAMES.values())}

    def conv(p: Param, role: str, name: str) -> Param:
        if role == "router":   # routers keep full precision whatever they are called
            return p
        return Param(convert_tensor(p.raw, types[name] if types else fmt))

    embed = conv(params.embed, "embed", "token_embd.weight")
    head = embed if params.head is params.embed else conv(params.head, "head", "output.weight")
    layers = [LayerParams(**{f: conv(getattr(lp, f), f, f"blk.{i}.{gguf_name[f]}") for f in lp.__dataclass_fields__})
              for i, lp in enumerate(params.layers)]
    return ModelParams(embed=embed, layers=layers, norm=params.norm, head=head)
