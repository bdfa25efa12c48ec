"""Model: a loaded SmallThinker bound to one backend's op table."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from . import graph
from .backend import Backend, ModelParams, OpTable, Param
from .config import ModelConfig
from .errors import InputError

DEFAULT_CHUNK = 256


class Session:
    """Per-conversation decoding state: the KV cache and the tokens it holds. Not thread-safe;
    one model serves many sessions (one per thread)."""

    def __init__(self, model: "Model", capacity: int | None = None):
        self.model = model
        self.capacity = capacity or model.config.max_position_embeddings
        self.cache = model.ops.new_cache(model.config, min(self.capacity, 4096))
        self.tokens: list[int] = []

    def feed(self, ids: Sequence[int], all_logits: bool = False, chunk: int | None = None) -> np.ndarray:
        """Append tokens (prefill in chunks) and return float32 logits: every position's [T, V] when
        all_logits, else the last position's [V]."""
        m = self.model
        m.check_files()
        ids = m.check_ids(ids, start=len(self.tokens))
        chunk = chunk or m.chunk_size
        out = []
        for s in range(0, len(ids), chunk):
            part = ids[s:s + chunk]
            pos = np.arange(len(self.tokens), len(self.tokens) + len(part), dtype=np.int64)
            logits = m._forward(part, pos, self.cache, last_only=not all_logits)
            if all_logits or s + chunk >= len(ids):
                out.append(m.ops.to_numpy(logits))
            self.tokens.extend(int(t) for t in part)
        logits = (out[0] if len(out) == 1 else np.concatenate(out)).astype(np.float32, copy=False)
        return logits if all_logits else logits[-1]


class Model:
    def __init__(self, config: ModelConfig, params: ModelParams, backend: Backend, ops: OpTable,
                 tokenizer: Any = None, selection: Any = None, path: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK):
        self.config = config
        self.params = params
        self.backend = backend
        self.ops = ops
        self.tokenizer = tokenizer
        self.selection = selection
        self.path = path
        self.chunk_size = chunk_size
        self.offload = None        # the ExpertCache in memory-budget mode
        self.memory_plan = None    # what the budget holds, planned before loading
        self.files = None          # FileWatch over the mapped weight files (st_sdk.weights.watch)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.path or 'in-memory'}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"experts={c.moe_num_active_primary_experts}/{c.moe_num_primary_experts}, backend={self.backend.name})")

    def check_files(self) -> None:
        """WeightError naming the file if a weight file changed on disk since it was loaded (once per
        step, before any kernel reads the mapped weights; see st_sdk/weights/watch.py)."""
        if self.files is not None:
            self.files.check()

    # ---- the data plane --------------------------------------------------------------------
    def _forward(self, ids: np.ndarray, positions: np.ndarray, cache, last_only: bool = False):
        return graph.forward(self.ops, self.config, self.params, ids, positions, cache, last_only)

    def check_ids(self, ids: Iterable[int] | np.ndarray, start: int = 0, name: str = "ids") -> np.ndarray:
        from .arguments import token_ids

        arr = token_ids(ids, name)
        if arr.ndim != 1:
            raise InputError(f"{name}: expected a 1-D sequence of token ids, got shape {list(arr.shape)}")
        if arr.size == 0:
            raise InputError(f"{name}: empty sequence of token ids")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name}: token ids must be integers, got {arr.dtype}")
        bad = (arr < 0) | (arr >= self.config.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise InputError(f"{name}[{j}] = {int(arr[j])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if start + arr.size > self.config.max_position_embeddings:
            raise InputError(f"{name}: {start + arr.size} tokens exceed the context length "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        return arr.astype(np.int64)

    def session(self, capacity: int | None = None) -> Session:
        return Session(self, capacity)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 logits [T, vocab] for a fresh sequence."""
        ids = self.check_ids(ids)
        return self.session(capacity=len(ids)).feed(ids, all_logits=True)

    # ---- generation (text in, text out) ------------------------------------------------------
    def generate(self, prompt, **kwargs):
        from .generation import generate

        return generate(self, prompt, **kwargs)

    def chat(self, messages, **kwargs):
        from .generation import chat

        return chat(self, messages, **kwargs)

    def agenerate(self, prompt, **kwargs):
        """Async iterator of the text pieces generate(stream=True) yields."""
        from .generation import agenerate

        return agenerate(self, prompt, **kwargs)

    def conversation(self, system: str | None = None, **defaults):
        """A multi-turn chat that keeps its KV cache between turns (see generation.Conversation)."""
        from .generation import Conversation

        return Conversation(self, system=system, **defaults)


def prepare_params(backend: Backend, params: ModelParams, config: ModelConfig) -> ModelParams:
    """Each weight through `backend.prepare` once (shared tensors, like a tied head, once), then
    `backend.prepare_model`."""
    done: dict[int, Param] = {}

    def prep(p: Param, role: str) -> Param:
        if getattr(p.raw, "offloaded", False):
            return p   # experts under a memory budget are read through the cache, never prepared
        if id(p) not in done:
            done[id(p)] = Param(p.raw, backend.prepare(p, role))
        return done[id(p)]

    embed = prep(params.embed, "embed")
    prepared = ModelParams(embed=embed, layers=[], norm=prep(params.norm, "norm"),
                           head=prep(params.head, "head") if params.head is not params.embed else embed)
    for lp in params.layers:
        prepared.layers.append(type(lp)(**{f: prep(getattr(lp, f), f) for f in lp.__dataclass_fields__}))
    backend.prepare_model(prepared, config)
    return prepared


def build_model(config: ModelConfig, params: ModelParams, backend: str | Backend | Sequence[str] = "auto",
                dtype: str | None = None, n_threads: int | None = None, strict: bool = False,
                tokenizer: Any = None, path: str | None = None, weight_format: str | None = None,
                tune: bool = False, max_memory: str | int | None = None, context: int | None = None,
                prefetch: bool = True, **kw) -> Model:
    """Choose a backend, prepare the weights once and bind the op table (and any plugin's step wrapper).

    max_memory: run within this many bytes ('1GiB'): experts stay in the file and are read on demand
    into an LRU cache sized from the budget (st_sdk.offload); context is the longest sequence the
    memory plan provides for (default min(max_position_embeddings, 4096)); prefetch=False stops
    reading experts as soon as the router picks them (to measure what prefetch buys).
    """
    from .registry import get_registry
    from .selection import select_backend

    offload = None
    if max_memory is not None:
        from .offload.experts import setup_offload

        params, *offload = setup_offload(config, params, max_memory, context=context)

    backend_obj, selection = select_backend(backend, config=config, params=params, dtype=dtype,
                                            n_threads=n_threads, strict=strict, tune=tune,
                                            weight_format=weight_format)
    prepared = prepare_params(backend_obj, params, config)
    ops = selection.ops
    if offload is not None:
        from .offload.experts import offload_ops

        cache, plan = offload
        plan.account(int(backend_obj.describe().get("extra_resident_bytes", 0)))
        if plan.slots != cache.slots:
            cache.resize(plan.slots)
        ops = offload_ops(ops, backend_obj, prepared, cache, prefetch)
    model = Model(config, prepared, backend_obj, ops, tokenizer=tokenizer, selection=selection, path=path, **kw)
    if offload is not None:
        model.offload, model.memory_plan = offload
        selection.offload = tuple(offload)
    # tracing/profiling plugins wrap the whole step once here; nothing is dispatched per op or token
    step, wrappers = get_registry().wrap_step(model._forward, backend_obj, config)
    if wrappers:
        model._forward = step
        selection.step_wrappers = wrappers
    return model
