"""The JAX backend: every op, and a fused `forward` compiled with `jax.jit` once per shape bucket.

Device: the first GPU/TPU jax sees, else CPU. Compute dtype "float32" or "bfloat16" (default
bfloat16: it halves the bytes every decode step streams and the memory held; on CPU it decodes about
1.6x faster than float32, measured; norms, the router and every activation stay float32). Weights are
converted once at load (Q8_0/Q4_0/F16/BF16 dequantised to the compute dtype; HF per-expert tensors
stacked). The decode step (one token) and prefill chunks (padded to 8/32/128 tokens, padding masked)
each compile once; the KV cache is a donated pytree of static shapes updated with
dynamic_update_slice; experts are picked with gathers; only the logits come back to the host.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from collections import Counter

import numpy as np

from st_sdk.backend import Backend, ModelParams, Param
from st_sdk.errors import InputError

log = logging.getLogger("st_sdk")

DTYPES = ("float32", "bfloat16")
#: roles kept float32 whatever the compute dtype: cheap, and their precision decides the top-k
FLOAT32_ROLES = ("attn_norm", "ffn_norm", "norm", "router")
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
    install_hint = 'pip install -e ".[jax]" (from a clone of st-sdk)'

    def __init__(self, n_threads: int | None = None, dtype: str | None = None):
        super().__init__(n_threads=n_threads, dtype=dtype)
        if dtype not in (None, "auto", *DTYPES):
            raise InputError(f"jax backend: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self._ready = False
        #: traces of the fused step per (bucket, cache capacities, last_only): each is one compilation
        self.compilations: Counter = Counter()

    # ---- control plane (is_available imports `requires`) ---------------------------------
    def _setup(self) -> None:
        if self._ready:
            return
        import jax
        import jax.numpy as jnp

        from . import ops

        self.jax, self.jnp, self.ops = jax, jnp, ops
        self.device = jax.devices()[0]
        self.accelerator = self.device.platform != "cpu"
        if self.dtype not in DTYPES:
            self.dtype = "bfloat16"
        self.compute_dtype = getattr(jnp, self.dtype)
        cores = os.cpu_count() or 1
        if self.n_threads and self.n_threads > cores:
            log.warning("jax backend: n_threads=%d is more than the %d cores here", self.n_threads, cores)
        # the op-level API: each op jitted once per input shape
        self._matmul = jax.jit(ops.matmul)
        self._embed = jax.jit(ops.embed)
        self._rms_norm = jax.jit(ops.rms_norm, static_argnums=2)
        self._rope = jax.jit(ops.rope)
        self._attend = jax.jit(ops.attend_and_append, static_argnums=6)
        self._route = jax.jit(ops.route, static_argnums=(2, 3))
        self._moe = jax.jit(ops.moe, static_argnums=6)
        self._ready = True

    def devices(self) -> list[str]:
        try:
            import jax
        except ImportError:
            return []
        return [f"{d.platform}:{d.id}" for d in jax.devices()]

    def score(self, hardware, fmt: str) -> float:
        self._setup()
        return 90.0 if self.accelerator else 4.0

    def describe(self):
        self._setup()
        return {"device": f"{self.device.platform}:{self.device.id} ({self.device.device_kind})",
                "compute_dtype": self.dtype,
                "weights": f"converted once at load to {self.dtype} (F16/BF16/Q8_0/Q4_0 dequantised at load; "
                           f"norms and router float32)" + ("" if self.accelerator else
                                                           "; matmuls convert cache-sized chunks to float32"),
                "compiled": "decode step and prefill chunks of " + "/".join(map(str, BUCKETS[1:])) +
                            " tokens, once per bucket",
                "threads": f"XLA's CPU pool, {os.cpu_count()} cores (fixed when jax starts)"}

    @property
    def compile_count(self) -> int:
        return sum(self.compilations.values())

    # ---- weights -------------------------------------------------------------------------
    def prepare(self, param: Param, role: str):
        self._setup()
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
        self._setup()
        cos, sin = self.ops.rope_tables(np.arange(config.max_position_embeddings), config.head_dim,
                                        config.rope_theta)
        layer_fields = params.layers[0].__dataclass_fields__ if params.layers else ()
        tree = {"embed": params.embed.value, "norm": params.norm.value, "head": params.head.value,
                "cos": self.jnp.asarray(cos), "sin": self.jnp.asarray(sin),
                "layers": [{f: getattr(lp, f).value for f in layer_fields} for lp in params.layers]}
        params.extra["jax"] = (tree, self._make_step(config))

    def to_numpy(self, x) -> np.ndarray:
        a = np.asarray(x)
        return a.astype(np.float32, copy=False) if a.dtype.kind == "f" or a.dtype == object else a

    def from_numpy(self, x: np.ndarray):
        self._setup()
        return self.jnp.asarray(x)

    # ---- the op set ----------------------------------------------------------------------
    def embed(self, table: Param, ids):
        self._setup()
        return self._embed(table.value, self.jnp.asarray(np.asarray(ids), self.jnp.int32))

    def rms_norm(self, x, weight: Param, eps: float):
        self._setup()
        return self._rms_norm(self.jnp.asarray(x), weight.value, float(eps))

    def linear(self, x, weight: Param):
        self._setup()
        return self._matmul(self.jnp.asarray(x, self.jnp.float32), weight.value)

    def rope(self, x, positions, theta: float):
        self._setup()
        cos, sin = self.ops.rope_tables(np.asarray(positions), x.shape[-1], theta)
        return self._rope(self.jnp.asarray(x), cos, sin)

    def new_cache(self, config, capacity: int):
        self._setup()
        from .cache import JaxCache

        # on CPU the cache stays float32: bf16-typed arrays are slow there, and it is small next to the weights
        return JaxCache(config, capacity, self.compute_dtype if self.accelerator else self.jnp.float32)

    def attention(self, q, k, v, layer_cache, positions, window):
        self._setup()
        pos = np.asarray(positions, np.int64)
        layer_cache.ensure(int(pos.max()) + 1)
        jnp = self.jnp
        out, layer_cache.arrays = self._attend(
            jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
            layer_cache.arrays, jnp.asarray(pos, jnp.int32), jnp.ones(len(pos), bool), window)
        return out

    def route(self, x, router: Param, k: int, softmax: bool):
        self._setup()
        return self._route(self.jnp.asarray(x, self.jnp.float32), router.value, int(k), bool(softmax))

    def moe(self, x, gate: Param, up: Param, down: Param, ids, weights):
        self._setup()
        jnp = self.jnp
        return self._moe(jnp.asarray(x, jnp.float32), gate.value, up.value, down.value,
                         jnp.asarray(np.asarray(ids), jnp.int32), jnp.asarray(weights, jnp.float32),
                         int(gate.raw.shape[0]))

    # ---- the fused layer and step --------------------------------------------------------
    @staticmethod
    def _layer(ops, cfg, i, lp, h, pos, valid, kv, cos, sin):
        """One decoder layer, traced inside the step (or jitted alone for the `layer` op)."""
        T = h.shape[0]
        nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        a = ops.rms_norm(h, lp["attn_norm"], eps)
        q = ops.matmul(a, lp["wq"]).reshape(T, nH, hd)
        k = ops.matmul(a, lp["wk"]).reshape(T, nKV, hd)
        v = ops.matmul(a, lp["wv"]).reshape(T, nKV, hd)
        # the router reads the raw layer input, before any norm
        w, picked = ops.route(h, lp["router"], cfg.moe_num_active_primary_experts,
                              cfg.moe_primary_router_apply_softmax)
        if cfg.layer_uses_rope(i):                               # NoPE layers skip it for q and k
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        attn, kv = ops.attend_and_append(q, k, v, kv, pos, valid, cfg.layer_window(i))
        h = h + ops.matmul(attn, lp["wo"])
        m = ops.rms_norm(h, lp["ffn_norm"], eps)
        return h + ops.moe(m, lp["gate"], lp["up"], lp["down"], picked, w, cfg.moe_num_primary_experts), kv

    def layer(self, cfg, i, layer_params, h, positions, layer_cache):
        self._setup()
        jnp = self.jnp
        if not hasattr(self, "_layer_jit"):
            self._layer_jit = self.jax.jit(lambda cfg, i, *a: self._layer(self.ops, cfg, i, *a),
                                           static_argnums=(0, 1))
        pos = np.asarray(positions, np.int64)
        layer_cache.ensure(int(pos.max()) + 1)
        cos, sin = self.ops.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
        lp = {f: getattr(layer_params, f).value for f in layer_params.__dataclass_fields__}
        out, layer_cache.arrays = self._layer_jit(
            cfg, i, lp, jnp.asarray(h, jnp.float32), jnp.asarray(pos, jnp.int32), jnp.ones(len(pos), bool),
            layer_cache.arrays, cos, sin)
        return out

    def _make_step(self, cfg):
        jax, jnp, ops = self.jax, self.jnp, self.ops

        def step(tree, caches, ids, pos, n_valid, last_only):
            T = ids.shape[0]
            # runs only while tracing: one count per compilation
            self.compilations[(T, tuple(kv[0].shape[0] for kv in caches), last_only)] += 1
            valid = jnp.arange(T) < n_valid
            h = ops.embed(tree["embed"], ids)
            cos, sin = tree["cos"][pos], tree["sin"][pos]
            new_caches = []
            for i, lp in enumerate(tree["layers"]):
                h, kv = self._layer(ops, cfg, i, lp, h, pos, valid, caches[i], cos, sin)
                new_caches.append(kv)
            if last_only:
                h = jax.lax.dynamic_slice_in_dim(h, n_valid - 1, 1)
            h = ops.rms_norm(h, tree["norm"], cfg.rms_norm_eps)
            return ops.matmul(h, tree["head"]), new_caches

        return jax.jit(step, static_argnames="last_only", donate_argnums=1)

    def forward(self, cfg, params: ModelParams, ids, positions, cache, last_only: bool = False):
        self._setup()
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
            # padding repeats the last token at its position: it sees what that token sees, and
            # is neither written to the cache nor returned
            pad_ids = np.concatenate([part_ids, np.repeat(part_ids[-1:], T - n)]).astype(np.int32)
            pad_pos = np.concatenate([part_pos, np.repeat(part_pos[-1:], T - n)]).astype(np.int32)
            inputs = self.jax.device_put((pad_ids, pad_pos, np.int32(n)), self.device)   # the only upload
            logits, cache.arrays = step(tree, cache.arrays, *inputs, last_only=bool(last_only))
            out.append(logits if last_only else logits[:n])
        return out[-1] if last_only or len(out) == 1 else jnp.concatenate(out)
