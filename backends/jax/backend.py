"""The JAX backend: every op, and `forward`, the graph (st_sdk/graph.py) traced over jax functions
and compiled with `jax.jit` once per shape bucket.

Device: the first GPU/TPU jax sees, else CPU. Compute dtype "float32" or "bfloat16" (default
bfloat16: it halves the bytes every decode step streams and the memory held; on CPU it decodes about
1.6x faster than float32, measured; norms, the router and every activation stay float32). Weights are
converted once at load (every GGUF block type and F16/BF16 dequantised to the compute dtype; HF per-expert tensors
stacked). The decode step (one token) and prefill chunks (padded to 8/32/128 tokens, padding masked)
each compile once; a batched step (several sequences, one token each: the server's decode) compiles
once per batch size and cache shapes; the KV cache is a donated pytree of static shapes updated with
dynamic_update_slice (the graph's `attention` returns the updated arrays); experts are picked with
gathers; only the logits come back to the host.
"""
from __future__ import annotations

import importlib.metadata
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np

from st_sdk import graph, kv
from st_sdk.backend import (COMPUTE_DTYPES, DTYPE_ALIASES, FLOAT32_ROLES, Backend, LayerParams, ModelParams,
                            OpTable, Param, is_offloaded)
from st_sdk.errors import InputError
from st_sdk.hardware import resolve_threads
from st_sdk.weights.tensor import FLOATS, QUANT_SIZES

#: prefill chunk buckets (tokens); a longer feed runs in chunks of the largest
BUCKETS = (1, 8, 32, 128)
#: elements per converted chunk of a Packed weight on CPU (2 MiB of float32: about one core's L2)
CHUNK_ELEMS = 512 * 1024


def _version() -> str:
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class JaxBackend(Backend):
    name = "jax"
    version = _version()
    requires = ("jax",)
    formats = FLOATS
    converts = tuple(QUANT_SIZES)   # every GGUF block type, dequantised to the compute dtype at load
    install_hint = 'pip install -e ".[jax]" (from a clone of st-sdk)'
    #: KV cache storage types (f16 by default: half the bytes of float32 per token)
    kv_dtypes = ("f16", "bf16", "f32")
    #: under max_memory its moe runs on the expert cache, each expert dequantised to the compute dtype as
    #: it is read (expert_layout); only when named: "auto" under a budget does not import jax
    supports_offload = "named"

    def __init__(self, n_threads: int | None = None, dtype: str | None = None):
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        super().__init__(n_threads=n_threads, dtype=dtype)
        if dtype not in (None, "auto", *COMPUTE_DTYPES):
            raise InputError(f"jax backend: dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
        #: traces of the fused step per (bucket, cache capacities, last_only): each is one compilation
        self.compilations: Counter = Counter()

    # ---- control plane (is_available imports `requires`, then runs setup) ------------------
    def setup(self) -> None:
        """Import jax, pick the device and compute dtype, jit the op-level API."""
        import jax
        import jax.numpy as jnp

        from . import ops

        self.jax, self.jnp, self.ops = jax, jnp, ops
        self.device = jax.devices()[0]
        self.accelerator = self.device.platform != "cpu"
        if self.dtype not in COMPUTE_DTYPES:
            self.dtype = "bfloat16"
        self.compute_dtype = getattr(jnp, self.dtype)
        if self.n_threads is not None:   # XLA's pool is fixed when jax starts: only say when it is too big
            resolve_threads(self.n_threads)
        # the op-level API: each op jitted once per input shape
        self._matmul = jax.jit(ops.matmul)
        self._embed = jax.jit(ops.embed)
        self._rms_norm = jax.jit(ops.rms_norm, static_argnums=2)
        self._rope = jax.jit(lambda q, k, cos, sin: (ops.rope(q, cos, sin), ops.rope(k, cos, sin)))
        self._attend = jax.jit(ops.attend_and_append, static_argnums=6)
        self._route = jax.jit(ops.route, static_argnums=(2, 3))
        self._moe = jax.jit(ops.moe, static_argnums=6)

    def devices(self) -> list[str]:
        try:
            import jax
        except ImportError:
            return []
        return [f"{d.platform}:{d.id}" for d in jax.devices()]

    def score(self, hardware, fmt: str) -> float:
        self.check_available()
        return 90.0 if self.accelerator else 4.0

    def describe(self):
        self.check_available()
        return {"device": f"{self.device.platform}:{self.device.id} ({self.device.device_kind})",
                "compute_dtype": self.dtype,
                "weights": f"converted once at load to {self.dtype} (F16/BF16 and quantised types dequantised at load; "
                           f"norms and router float32)" + ("" if self.accelerator else
                                                           "; matmuls convert cache-sized chunks to float32"),
                "attention": "jax.nn.dot_product_attention, " + (
                    "in the cache's storage type (cuDNN's fused kernel where it applies, else XLA)" if self.accelerator
                    else "float32 on XLA (keys and values widened from the cache's storage type)"),
                "compiled": "decode step and prefill chunks of " + "/".join(map(str, BUCKETS[1:])) +
                            " tokens, once per bucket; batched decode once per batch size",
                "threads": f"XLA's CPU pool, {os.cpu_count()} cores (fixed when jax starts)"}

    @property
    def compile_count(self) -> int:
        return sum(self.compilations.values())

    # ---- weights -------------------------------------------------------------------------
    def prepare(self, param: Param, role: str):
        t = param.raw
        jnp = self.jnp
        if role in FLOAT32_ROLES or len(t.shape) == 1:
            return jnp.asarray(t.numpy(), jnp.float32)
        if self.accelerator:
            x = self.ops.convert(t, self.dtype)
            x = x.view(jnp.bfloat16) if self.dtype == "bfloat16" else x
            return self.jax.device_put(x, self.device)
        return self.ops.pack(t, self.dtype, CHUNK_ELEMS)

    def prepare_model(self, params: ModelParams, config) -> None:
        cos, sin = self.ops.rope_tables(np.arange(config.max_position_embeddings), config.head_dim,
                                        config.rope_theta)
        layer_fields = params.layers[0].__dataclass_fields__ if params.layers else ()
        tree = {"embed": params.embed.value, "norm": params.norm.value, "head": params.head.value,
                "cos": self.jnp.asarray(cos), "sin": self.jnp.asarray(sin),
                "layers": [{f: getattr(lp, f).value for f in layer_fields} for lp in params.layers]}
        params.extra["jax"] = (tree, self._step(config, params))

    def to_numpy(self, x) -> np.ndarray:
        a = np.asarray(x)
        return a.astype(np.float32, copy=False) if a.dtype.kind == "f" or a.dtype == object else a

    def from_numpy(self, x: np.ndarray):
        return self.jnp.asarray(x)

    # ---- the op set, one jitted op at a time -----------------------------------------------
    def context(self, config, positions):
        pos = np.asarray(positions, np.int64)
        cos, sin = self.ops.rope_tables(pos, config.head_dim, config.rope_theta)
        return self.ops.JaxContext(pos, config.rope_theta, self.jnp.asarray(pos, self.jnp.int32),
                                   self.jnp.ones(len(pos), bool), cos, sin)

    def embed(self, table: Param, ids):
        return self._embed(table.value, self.jnp.asarray(np.asarray(ids), self.jnp.int32))

    def rms_norm(self, x, weight: Param, eps: float):
        return self._rms_norm(self.jnp.asarray(x), weight.value, float(eps))

    def linear(self, x, weight: Param):
        return self._matmul(self.jnp.asarray(x, self.jnp.float32), weight.value)

    def rope(self, q, k, ctx):
        return self._rope(self.jnp.asarray(q), self.jnp.asarray(k), ctx.cos, ctx.sin)

    def new_cache(self, config, capacity: int, kv_dtype: str | None = None):
        from .cache import JaxCache

        kv_dtype = kv.storage(kv_dtype or self.kv_dtypes[0])
        if kv_dtype not in self.kv_dtypes:
            raise InputError(f"kv_dtype={kv_dtype!r}: the jax backend stores its KV cache as one of "
                             f"{', '.join(self.kv_dtypes)}")
        return JaxCache(config, capacity, kv_dtype)

    def attention(self, q, k, v, layer_cache, ctx, window):
        layer_cache.spec.check(k.shape[1], k.shape[2], window)
        layer_cache.ensure(int(ctx.positions.max()) + 1)
        jnp = self.jnp
        out, layer_cache.arrays = self._attend(
            jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
            layer_cache.arrays, ctx.device_positions, ctx.valid, window)
        return out, layer_cache

    def route(self, x, router: Param, k: int, softmax: bool):
        return self._route(self.jnp.asarray(x, self.jnp.float32), router.value, int(k), bool(softmax))

    def moe(self, x, gate: Param, up: Param, down: Param, ids, weights):
        if is_offloaded(gate):
            return self._offloaded_moe(x, gate.raw, up.raw, down.raw, ids, weights)
        jnp = self.jnp
        return self._moe(jnp.asarray(x, jnp.float32), gate.value, up.value, down.value,
                         jnp.asarray(np.asarray(ids), jnp.int32), jnp.asarray(weights, jnp.float32),
                         int(gate.raw.shape[0]))

    def expert_layout(self, fmt: str, rows: int, cols: int, role: str):
        """Under a memory budget, experts are held in the cache dequantised to the compute dtype, as the
        loaded ones are: converted once per read, never per use."""
        from st_sdk.offload.experts import Dequantised

        return Dequantised(fmt, rows, cols, self.dtype)

    def _offloaded_moe(self, x, gate, up, down, ids, weights):
        """MoE over the memory-budget cache's slots: the picked experts stacked into arrays (as many at
        once as the cache holds) and run by the same jitted moe as loaded experts, with ids local to
        the group."""
        import ml_dtypes

        jnp = self.jnp
        cache, layer = gate.cache, gate.layer
        x = jnp.asarray(x, jnp.float32)
        ids_np = np.asarray(ids).reshape(x.shape[0], -1)
        w = np.asarray(weights, np.float32).reshape(ids_np.shape)
        layouts = (gate.layout, up.layout, down.layout)
        picked = list(dict.fromkeys(ids_np.ravel().tolist()))
        group = max(1, cache.slots - 1)
        out = jnp.zeros(x.shape, jnp.float32)
        for start in range(0, len(picked), group):
            experts = picked[start:start + group]
            views = cache.get_many(layer, experts)
            stacks = [jnp.asarray(np.stack([lay.array(v[j]) for v in views]).view(ml_dtypes.bfloat16)
                                  if lay.dtype == "bfloat16" else np.stack([lay.array(v[j]) for v in views]))
                      for j, lay in enumerate(layouts)]
            local = np.full(int(gate.shape[0]), len(experts), np.int32)   # not in this group: a zero weight
            local[experts] = np.arange(len(experts))
            lid = local[ids_np]
            in_group = lid < len(experts)
            out = out + self._moe(x, *stacks, jnp.asarray(np.where(in_group, lid, 0), jnp.int32),
                                  jnp.asarray(np.where(in_group, w, 0.0), jnp.float32), len(experts))
        return out

    # ---- the compiled step: the graph traced over jax functions ---------------------------
    def _traced_ops(self, tree, valid, n_experts: int) -> OpTable:
        """The op table the graph runs on inside the compiled step: weights are the traced arrays of
        `tree`, the cache of each layer its (keys, values, positions) arrays, returned updated.
        valid=None: every row of every context is real (the batched decode step)."""
        o, jnp = self.ops, self.jnp

        def context(cfg, pos):
            ok = jnp.ones(pos.shape[0], bool) if valid is None else valid
            return o.JaxContext(pos, cfg.rope_theta, pos, ok, tree["cos"][pos], tree["sin"][pos])

        def attention(q, k, v, kv, ctx, window):
            return o.attend_and_append(q, k, v, kv, ctx.device_positions, ctx.valid, window)

        def attention_batch(q, k, v, kvs, ctxs, seg, window):   # seg is static: one row per sequence
            outs, kept = [], []
            for cache, ctx, a, b in zip(kvs, ctxs, seg[:-1], seg[1:]):
                out, cache = attention(q[a:b], k[a:b], v[a:b], cache, ctx, window)
                outs.append(out)
                kept.append(cache)
            return jnp.concatenate(outs), kept

        return OpTable(
            context=context,
            embed=lambda table, ids: o.embed(table.value, ids),
            rms_norm=lambda x, w, eps: o.rms_norm(x, w.value, eps),
            linear=lambda x, w: o.matmul(x, w.value),
            qkv=lambda x, wq, wk, wv: (o.matmul(x, wq.value), o.matmul(x, wk.value), o.matmul(x, wv.value)),
            rope=lambda q, k, ctx: (o.rope(q, ctx.cos, ctx.sin), o.rope(k, ctx.cos, ctx.sin)),
            new_cache=self.new_cache, attention=attention,
            route=lambda x, w, k, softmax: o.route(x, w.value, k, softmax),
            moe=lambda x, g, u, d, ids, w: o.moe(x, g.value, u.value, d.value, ids, w, n_experts),
            layer=None, forward=None, to_numpy=self.to_numpy, from_numpy=self.from_numpy, native=[], fallbacks=[],
            attention_batch=attention_batch)

    def _step(self, cfg, params: ModelParams):
        """The jitted step of this config, made once per backend instance: another model of the same
        shape (the same weights in another type, all converted to the compute dtype) reuses its
        compilations (the step reads only the traced weights, never the stored ones)."""
        steps = self.__dict__.setdefault("_steps", {})
        key = (cfg, params.head is params.embed)
        if key not in steps:
            steps[key] = self._make_step(cfg, params)
        return steps[key]

    @staticmethod
    def _traced_params(params: ModelParams, tree) -> ModelParams:
        """`params` with the traced arrays of `tree` as values (the raw tensors kept for their shapes)."""
        names = params.layers[0].__dataclass_fields__ if params.layers else ()
        layers = [LayerParams(**{f: Param(getattr(lp, f).raw, tree["layers"][i][f]) for f in names})
                  for i, lp in enumerate(params.layers)]
        embed = Param(params.embed.raw, tree["embed"])
        head = embed if params.head is params.embed else Param(params.head.raw, tree["head"])
        return ModelParams(embed, layers, Param(params.norm.raw, tree["norm"]), head)

    def _make_step(self, cfg, params: ModelParams):
        jax, jnp = self.jax, self.jnp

        def step(tree, caches, ids, pos, n_valid, last_only):
            T = ids.shape[0]
            # runs only while tracing: one count per compilation
            self.compilations[(T, tuple(kv[0].shape[0] for kv in caches), last_only)] += 1
            ops = self._traced_ops(tree, jnp.arange(T) >= T - n_valid, cfg.moe_num_primary_experts)
            cache = SimpleNamespace(layers=list(caches))
            logits = graph.forward(ops, cfg, self._traced_params(params, tree), ids, pos, cache, last_only)
            return logits, cache.layers

        return jax.jit(step, static_argnames="last_only", donate_argnums=1)

    def _batch_step(self, cfg, params: ModelParams):
        """The jitted decode step over B sequences (one token each, each its own cache): the graph's
        forward_batch traced once per (B, cache capacities)."""
        steps = self.__dict__.setdefault("_batch_steps", {})
        key = (cfg, params.head is params.embed)
        if key not in steps:
            def step(tree, caches, ids, pos):
                B = ids.shape[0]
                self.compilations[("batch", B, tuple(tuple(kv[0].shape[0] for kv in c) for c in caches))] += 1
                ops = self._traced_ops(tree, None, cfg.moe_num_primary_experts)
                seqs = [SimpleNamespace(layers=list(c)) for c in caches]
                logits = graph.forward_batch(ops, cfg, self._traced_params(params, tree), ids, pos, seqs,
                                             np.arange(B + 1))
                return logits, [c.layers for c in seqs]

            steps[key] = self.jax.jit(step, donate_argnums=1)
        return steps[key]

    def forward_batch(self, cfg, params: ModelParams, ids, positions, caches, seg):
        """One step over several sequences: those decoding one token run together in one compiled
        call (each dense weight read once for all of them); a sequence feeding
        a prompt chunk runs its own compiled step beside it. Logits [B, vocab], in `caches` order."""
        seg = np.asarray(seg, np.int64)
        if seg.ndim != 1 or len(seg) != len(caches) + 1 or seg[0] != 0 or np.any(np.diff(seg) <= 0):
            raise InputError(f"forward_batch: seg must be increasing row offsets from 0, one segment per cache "
                             f"({len(caches)} caches), got {seg.tolist()}")
        if len({id(c) for c in caches}) != len(caches):
            raise InputError("forward_batch: a cache appears twice in one step")
        if "jax" not in params.extra:
            self.prepare_model(params, cfg)
        ids, positions = np.asarray(ids, np.int64), np.asarray(positions, np.int64)
        one = [b for b in range(len(caches)) if seg[b + 1] - seg[b] == 1]
        rows: dict[int, object] = {}
        if len(one) > 1:
            for b in one:
                caches[b].ensure(int(positions[seg[b]]) + 1)
            dev = self.jax.device_put((ids[seg[one]].astype(np.int32), positions[seg[one]].astype(np.int32)),
                                      self.device)
            logits, arrays = self._batch_step(cfg, params)(params.extra["jax"][0], [caches[b].arrays for b in one],
                                                           *dev)
            for j, b in enumerate(one):
                caches[b].arrays = arrays[j]
                rows[b] = logits[j:j + 1]
        for b in range(len(caches)):
            if b not in rows:
                a, e = seg[b], seg[b + 1]
                rows[b] = self.forward(cfg, params, ids[a:e], positions[a:e], caches[b], last_only=True)
        return self.jnp.concatenate([rows[b] for b in range(len(caches))])

    def forward(self, cfg, params: ModelParams, ids, positions, cache, last_only: bool = False):
        jnp = self.jnp
        if "jax" not in params.extra:
            self.prepare_model(params, cfg)
        tree, step = params.extra["jax"]
        ids = np.asarray(ids, np.int64)
        positions = np.asarray(positions, np.int64)
        cache.ensure(int(positions.max()) + 1)
        out, size = [], BUCKETS[-1]
        for s in range(0, len(ids), size):
            part_ids, part_pos = ids[s:s + size], positions[s:s + size]
            n = len(part_ids)
            T = next(b for b in BUCKETS if b >= n)
            # padding goes first and repeats the first token at its position: it is neither written to
            # the cache nor returned, and the last row stays the last real token (the graph's last_only)
            pad_ids = np.concatenate([np.repeat(part_ids[:1], T - n), part_ids]).astype(np.int32)
            pad_pos = np.concatenate([np.repeat(part_pos[:1], T - n), part_pos]).astype(np.int32)
            inputs = self.jax.device_put((pad_ids, pad_pos, np.int32(n)), self.device)   # the only upload
            logits, cache.arrays = step(tree, cache.arrays, *inputs, last_only=bool(last_only))
            out.append(logits if last_only else logits[T - n:])
        return out[-1] if last_only or len(out) == 1 else jnp.concatenate(out)
