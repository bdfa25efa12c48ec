"""Micro-benchmarks of the heavy ops on each backend, at the preset's shapes: `linear` per weight
format (one token and a 128-token chunk), `moe` (k of E experts, ReGLU) and `attention` of one new
token at several cache lengths. Ops a backend does not provide run on the NumPy reference fallback
and are marked so in extra_info."""
from __future__ import annotations

import numpy as np
import pytest

from st_sdk.backend import Param, bind_ops
from st_sdk.synth import preset_config
from st_sdk.weights.tensor import WeightTensor, quantize

CACHE_LENGTHS = [128, 512, 2048]


@pytest.fixture(scope="module")
def backends(threads):
    made = {}

    def get(name):
        if name not in made:
            from st_sdk.registry import reference_backend
            from st_sdk.selection import select_backend

            b, _ = select_backend(name, n_threads=threads)
            made[name] = (b, bind_ops(b, reference_backend()))
        return made[name]

    return get


def _param(backend, name, fmt, x, role):
    raw = WeightTensor(name, fmt, x.shape, quantize(fmt, x), "<bench>")
    p = Param(raw)
    return Param(raw, backend.prepare(p, role))


def _note(benchmark, ops, op, backend_name, **info):
    benchmark.extra_info.update(backend=backend_name, native=op not in ops.fallbacks, **info)


@pytest.mark.parametrize("tokens", [1, 128])
def test_linear(benchmark, backends, backend_name, fmt, preset, tokens):
    cfg = preset_config(preset, layers=1)
    b, ops = backends(backend_name)
    rng = np.random.default_rng(0)
    w = _param(b, "wq", fmt, 0.02 * rng.standard_normal((cfg.q_dim, cfg.hidden_size), dtype=np.float32), "wq")
    x = ops.from_numpy(rng.standard_normal((tokens, cfg.hidden_size), dtype=np.float32))
    benchmark.group = f"linear {cfg.q_dim}x{cfg.hidden_size}, {tokens} token(s) ({preset})"
    _note(benchmark, ops, "linear", backend_name, format=fmt)
    benchmark(ops.linear, x, w)


@pytest.mark.parametrize("tokens", [1, 128])
def test_moe(benchmark, backends, backend_name, fmt, preset, tokens):
    cfg = preset_config(preset, layers=1)
    b, ops = backends(backend_name)
    E, F, H = cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    k = cfg.moe_num_active_primary_experts
    rng = np.random.default_rng(0)
    gate = _param(b, "gate", fmt, 0.02 * rng.standard_normal((E, F, H), dtype=np.float32), "gate")
    up = _param(b, "up", fmt, 0.02 * rng.standard_normal((E, F, H), dtype=np.float32), "up")
    down = _param(b, "down", fmt, 0.02 * rng.standard_normal((E, H, F), dtype=np.float32), "down")
    router = _param(b, "router", "f32", 0.02 * rng.standard_normal((E, H), dtype=np.float32), "router")
    x = ops.from_numpy(rng.standard_normal((tokens, H), dtype=np.float32))
    weights, ids = ops.route(x, router, k, False)
    benchmark.group = f"moe {k}/{E} experts {F}x{H}, {tokens} token(s) ({preset})"
    _note(benchmark, ops, "moe", backend_name, format=fmt)
    benchmark(ops.moe, x, gate, up, down, ids, weights)


@pytest.mark.parametrize("cache_len", CACHE_LENGTHS)
def test_attention(benchmark, backends, backend_name, preset, cache_len):
    """One new token attending over `cache_len` cached ones in a global layer (GQA, float32)."""
    cfg = preset_config(preset, layers=1, max_position_embeddings=max(cache_len * 2, 4096))
    b, ops = backends(backend_name)
    nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    cache = ops.new_cache(cfg, cache_len + 512).layers[0]

    def qkv(T):
        return [ops.from_numpy(rng.standard_normal((T, n, hd), dtype=np.float32)) for n in (nH, nKV, nKV)]

    ops.attention(*qkv(cache_len), cache, ops.context(cfg, np.arange(cache_len, dtype=np.int64)), None)   # fill
    q, k, v = qkv(1)
    pos = {"next": cache_len}

    def one():
        # the cache grows by one per call, as in decode (a few hundred calls at most)
        ops.attention(q, k, v, cache, ops.context(cfg, np.array([pos["next"]], dtype=np.int64)), None)
        pos["next"] += 1

    benchmark.group = f"attention {nH}/{nKV} heads x {hd}, 1 token ({preset})"
    _note(benchmark, ops, "attention", backend_name, cache_len=cache_len)
    benchmark.pedantic(one, rounds=200, warmup_rounds=5, iterations=1)
