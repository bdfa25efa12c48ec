"""Loading and assembly: `st_sdk.load(path, ...)` opens a model file and optionally converts its
weights; `build_model` chooses a backend, prepares the weights once and binds the op table."""
from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .backend import Backend, LayerParams, ModelParams, OpTable, Param, prepare_params
from .config import ModelConfig
from .errors import InputError
from .model import DEFAULT_CHUNK, Model
from .offload.experts import offload_ops, setup_offload
from .registry import get_registry, reference_backend
from .selection import select_backend


def load(path: str | Path, backend: str | Sequence[str] | Any = "auto", dtype: str | None = None,
         n_threads: int | None = None, strict: bool = False, tune: bool = False,
         quantize: str | None = None, file: str | None = None, **kw):
    """Load a SmallThinker model from an HF directory or a `.gguf` file (contract), or a Hugging Face
    Hub repository name ("owner/repo", with file="...gguf" for one file of a GGUF repository; see
    st_sdk.hub: the local cache first, then a download when a network is there).

    quantize: convert the matrices in memory at load: a type ('q8_0', 'q4_0', 'q4_k', 'q6_k', 'f16',
    ...; every matrix that type) or one of llama.cpp's mixes ('q4_k_m', 'q5_k_m', 'q3_k_m', ...: each
    tensor the type llama-quantize gives it); norms and the router stay f32. Other keyword arguments go
    to `build_model`: kv_dtype ('f16', 'q8_0', 'f32': how the KV cache stores keys and values),
    max_memory, context, prefetch, cache_policy, expert_file (the memory-budget mode).
    """
    from .arguments import check_load
    from .weights import open_model
    from .weights.export import GGUF_FORMATS, gguf_specs

    path, backend, dtype, n_threads, kw = check_load(path, backend, dtype, n_threads, strict, tune, quantize, kw)
    if file is not None and not isinstance(file, str):
        raise InputError(f"file: expected the name of a .gguf file in the repository, got {file!r}")
    if quantize is not None and quantize not in GGUF_FORMATS:
        raise InputError(f"quantize={quantize!r}: choose one of {', '.join(GGUF_FORMATS)}")
    from .hub import resolve

    mf = open_model(resolve(path, file))
    if quantize is not None:
        gguf_specs(mf.config, quantize)   # a mix using a type st-sdk cannot quantise fails here, not midway
    params = mf.params()
    if quantize is not None:
        params = convert_params(params, quantize, mf.config)
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


def convert_params(params, fmt: str, config=None):
    """ModelParams with the matrices re-stored as `fmt`: a type, or a llama.cpp mix (needs `config`:
    the per-tensor types depend on the layer count and shapes)."""
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


def build_model(config: ModelConfig, params: ModelParams, backend: str | Backend | Sequence[str] = "auto",
                dtype: str | None = None, n_threads: int | None = None, strict: bool = False,
                tokenizer: Any = None, path: str | None = None, weight_format: str | None = None,
                tune: bool = False, max_memory: str | int | None = None, context: int | None = None,
                prefetch: bool | str = "auto", kv_dtype: str | None = None, cache_policy: str = "lfru",
                expert_file: bool | str = "auto", **kw) -> Model:
    """Choose a backend, prepare the weights once and bind the op table (and any plugin's step wrapper).

    kv_dtype: how the KV cache stores keys and values: 'f16', 'q8_0' or 'f32' (as llama.cpp's
    --cache-type-k/v), among the types the backend's cache offers (`Backend.kv_dtypes`); default: its
    first (f16 on the c, torch and jax backends; f32 on the NumPy reference, the exact oracle).

    context: the most tokens one sequence may hold (KV cache and memory plan sized to it; see
    st_sdk.context for the default). max_memory: run within this many bytes ('1GiB'): experts stay in
    the file and are read on demand into a cache sized from the budget (st_sdk.offload), with the
    KV cache for `context` tokens (default min(max_position_embeddings, 4096)); prefetch: "auto" (the
    default) starts reading a layer's experts as soon as its router picks them, and also the experts
    the next three layers' routers pick from this layer's input (guesses, so reads overlap across layers)
    while such guesses prove right often enough to pay (st_sdk.offload.experts.Lookahead); True: the
    router's picks only; "lookahead": every guess too; False: nothing before the MoE needs it (to
    measure what prefetch buys); cache_policy:
    'lfru' (frequency-aware, the default) or 'lru' (st_sdk.offload.cache); expert_file: read the
    experts from a file written once in the backend's layout (st_sdk.offload.prepared): "auto" (the
    default) the existing one, else written on this first load where the backend converts the experts
    it reads and the disk keeps a tenth of itself (at most 16 GiB) free; True writes it first when
    missing; False never.
    """
    from .context import resolve_context
    from .offload.experts import row_read_bytes
    from .offload.prepared import attach, check_mode
    from .offload.profile import attach as keep_counts, find_kept

    context = resolve_context(config, context, budget=max_memory is not None)
    expert_file = check_mode(expert_file)
    offload = None
    if max_memory is not None:
        params, *offload = setup_offload(config, params, max_memory, context=context, kv_dtype=kv_dtype or "f16",
                                         policy=cache_policy)

    backend_obj, selection = select_backend(backend, config=config, params=params, dtype=dtype,
                                            n_threads=n_threads, strict=strict, tune=tune,
                                            weight_format=weight_format, offload=max_memory is not None)
    ops = selection.ops
    kv_dtype = resolve_kv_dtype(backend_obj, ops, kv_dtype)
    # what this model's preparation adds: the backend may already count copies of models it prepared
    # while being chosen (its smoke test's, a measured slice's), which are gone
    extra_before = int(backend_obj.describe().get("extra_resident_bytes", 0)) if offload is not None else 0
    prepared = prepare_params(backend_obj, params, config)
    if offload is not None:
        cache, plan = offload
        kept = find_kept(cache, config.moe_num_primary_experts, path)   # what earlier loads kept, read once
        ops = offload_ops(ops, backend_obj, prepared, cache, bool(prefetch),
                          lookahead={"auto": "auto", "lookahead": "always"}.get(prefetch),
                          live_shares=kept.live if kept else None,
                          kept_layouts=kept.layouts_for(backend_obj.name) if kept else None)
        counter = getattr(backend_obj, "live_counter", None)
        if counter is not None:   # this run's live shares, kept with the use counts for the next load
            cache.live_seen = counter(config.num_hidden_layers)
        plan.expert_bytes = cache.bundle_bytes   # the backend's layout may differ in size from the file's
        cache.row_maps = backend_obj.row_read_weights(prepared)
        plan.account(int(backend_obj.describe().get("extra_resident_bytes", 0)) - extra_before,
                     kv_bytes=config.kv_cache_bytes(plan.context, kv_dtype or "f32"),
                     row_read=row_read_bytes(cache.row_maps, plan.context),
                     activations=backend_obj.step_scratch_bytes(config, kw.get("chunk_size") or DEFAULT_CHUNK,
                                                                plan.context))
        if plan.slots != cache.slots:
            cache.resize(plan.slots)
        plan.expert_file = attach(cache, config.moe_num_primary_experts, expert_file)
        cache.drop_file_pages()
        # the experts earlier loads of this file used most, read now (st_sdk.offload.profile)
        keep_counts(cache, config.moe_num_primary_experts, kept)
        cache.commit()   # the slots' pages, faulted in while the first tokens wait for reads
    model = Model(config, prepared, backend_obj, ops, tokenizer=tokenizer, selection=selection, path=path,
                  kv_dtype=kv_dtype, **kw)
    model.context = context
    if offload is not None:
        model.offload, model.memory_plan = offload
        model._step_lock = threading.Lock()   # the expert cache serves one step at a time
        selection.offload = tuple(offload)
    # tracing/profiling plugins wrap the whole step once here; nothing is dispatched per op or token
    step, wrappers = get_registry().wrap_step(model._forward, backend_obj, config)
    if wrappers:
        model._forward = step
        selection.step_wrappers = wrappers
    return model


def resolve_kv_dtype(backend: Backend, ops: OpTable, requested: str | None) -> str | None:
    """The KV cache storage type: `requested` if the cache's maker offers it (the backend when it
    provides new_cache, else the NumPy reference), else that maker's default; None when it offers no
    choice. InputError names the choices."""
    from . import kv

    maker = backend if "new_cache" in ops.native else reference_backend()
    choices = tuple(getattr(maker, "kv_dtypes", ()) or ())
    if requested is None:
        return choices[0] if choices else None
    name = kv.storage(requested)
    if name not in choices:
        offered = f"one of {', '.join(choices)}" if choices else "no choice of kv_dtype"
        raise InputError(f"kv_dtype={requested!r}: the KV cache of backend '{maker.name}' offers {offered}")
    return name
