"""The C attention kernels (csrc/st_attention*) on the real model's head shapes and long contexts:
tiled prefill, decode split across threads and key ranges, rings, every KV storage type, every
kernel variant; the cache stores what the reference rounding gives."""
from __future__ import annotations

import numpy as np
import pytest

from st_sdk import kv
from st_sdk.backend import StepContext
from st_sdk.config import ModelConfig
from st_sdk.errors import InputError
from st_sdk_backends.numpy import ops as ref
from st_sdk_backends.numpy.cache import q8_0_decode, q8_0_encode

cb = pytest.importorskip("st_sdk_backends.c.backend")


def _backend(threads: int):
    b = cb.CBackend(n_threads=threads)
    if not b.is_available():
        pytest.skip(f"C backend unavailable: {b.unavailable_reason()}")
    return b


def _cfg(nH: int, nKV: int, hd: int, window: int | None) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=nH,
                       num_key_value_heads=nKV, head_dim=hd, moe_num_primary_experts=2,
                       moe_num_active_primary_experts=1, moe_ffn_hidden_size=32, rope_layout=(1,),
                       sliding_window_layout=(1 if window else 0,), sliding_window_size=window or 4096,
                       max_position_embeddings=1 << 16, source="<attention>")


def _run(b, cfg, steps, kv_dtype, seed=0, scale=1.5):
    """Feed chunks of `steps` tokens through one layer on C (storage kv_dtype) and on the reference
    (the same storage: NumPy rounds keys and values as that cache does); the worst relative error."""
    rng = np.random.default_rng(seed)
    nH, nKV, hd, window = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.layer_window(0)
    c = b.new_cache(cfg, 8, kv_dtype).layers[0]        # small: a global layer grows many times
    r = ref.new_cache(cfg, 8, kv_dtype).layers[0]
    worst, start = 0.0, 0
    for n in steps:
        q = scale * rng.standard_normal((n, nH, hd)).astype(np.float32)
        k = scale * rng.standard_normal((n, nKV, hd)).astype(np.float32)
        v = rng.standard_normal((n, nKV, hd)).astype(np.float32)
        ctx = StepContext(np.arange(start, start + n, dtype=np.int64), 1e4)
        got, c = b.attention(q, k, v, c, ctx, window)
        want, r = ref.attention(q, k, v, r, ctx, window)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        start += n
    return worst, c, r


# the 4B model's heads (12 q / 2 kv x 128) and the 21B's group of 7 (28 / 4), past block and tile edges
SHAPES = [(12, 2, 128, None, [300, 1, 1, 200, 1]), (12, 2, 128, 100, [150, 1, 70, 1, 1]),
          (28, 4, 128, None, [40, 1, 33]), (6, 1, 32, 17, [5, 1, 40, 3, 1, 1])]


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_reference_with_the_same_storage(kv_dtype, threads):
    """Against the reference storing keys and values the same way, only float summation order (and
    the exp2 polynomial) may differ: 2e-5 whatever the storage type, one thread or two."""
    b = _backend(threads)
    for nH, nKV, hd, window, steps in SHAPES:
        err, _, _ = _run(b, _cfg(nH, nKV, hd, window), steps, kv_dtype)
        assert err < 2e-5, f"{kv_dtype} {nH}/{nKV}x{hd} window {window}: {err:.2e}"


def test_long_decode_split_across_key_ranges_merges_exactly():
    """One query over 3,000 cached keys: two threads split the keys into ranges merged by the last to
    finish; the result is the reference's over the same stored keys (and so the one-thread result) up
    to float rounding. The reference gets the C cache's entries (its O(T x S) prefill is slow)."""
    cfg = _cfg(12, 2, 128, None)
    rng = np.random.default_rng(3)
    for threads in (1, 2):
        b = _backend(threads)
        c = b.new_cache(cfg, 8, "f16").layers[0]
        for start in (0, 1000, 2000):
            k = 1.5 * rng.standard_normal((1000, 2, 128)).astype(np.float32)
            v = rng.standard_normal((1000, 2, 128)).astype(np.float32)
            q = 1.5 * rng.standard_normal((1000, 12, 128)).astype(np.float32)
            _, c = b.attention(q, k, v, c, StepContext(np.arange(start, start + 1000), 1e4), None)
        r = ref.new_cache(cfg, 8, "f16").layers[0]
        r.append(*c.entries())
        for p in (3000, 3001):
            q, k, v = (rng.standard_normal((1, n, 128)).astype(np.float32) for n in (12, 2, 2))
            ctx = StepContext(np.array([p]), 1e4)
            got, c = b.attention(q, k, v, c, ctx, None)
            want, r = ref.attention(q, k, v, r, ctx, None)
            assert float(np.abs(got - want).max() / np.abs(want).max()) < 2e-5
        assert c.length == 3002


def test_the_cache_holds_the_reference_rounding():
    """Stored keys and values read back as NumPy's f16 cast and q8_0 rounding (ggml's: d = max|x|/127
    as f16, q = round(x / d)); f32 exactly."""
    cfg = _cfg(4, 2, 64, None)
    for kv_dtype in ("f32", "f16", "q8_0"):
        _, c, r = _run(_backend(1), cfg, [19, 1, 13], kv_dtype)
        (ck, cv, cp), (rk, rv, rp) = c.entries(), r.entries()
        assert np.array_equal(cp, rp)
        np.testing.assert_array_equal(ck, rk)
        np.testing.assert_array_equal(cv, rv)
    x = np.random.default_rng(1).standard_normal((3, 2, 64)).astype(np.float32)
    assert np.abs(q8_0_decode(q8_0_encode(x)) - x).max() <= np.abs(x).max() / 127


def test_ring_keeps_the_last_window_in_blocks():
    cfg = _cfg(4, 2, 32, 20)
    _, c, _ = _run(_backend(2), cfg, [50, 1, 1], "f16")
    _, _, pos = c.entries()
    assert sorted(pos.tolist()) == list(range(32, 52))
    assert len(c.pos) == 32   # a ring of 20 slots in whole blocks of 16


@pytest.mark.parametrize("kv_dtype", ["f16", "q8_0"])
def test_every_variant_matches_generic(kv_dtype):
    _, lib = cb.ffi_lib()
    variants = [v for v, code in cb.ops.VARIANTS.items() if lib.st_cpu_supports(code)]
    cfg = _cfg(12, 2, 128, 64)
    try:
        errs = {}
        for v in variants:
            cb.use_variant(v)
            errs[v] = _run(_backend(2), cfg, [100, 1, 37, 1], kv_dtype, seed=5)[0]
    finally:
        cb.use_variant(None)
    assert all(e < 2e-5 for e in errs.values()), errs


def test_kv_bytes_per_token():
    """f16 is half of f32 per token and q8_0 17/32 of f16 (ggml's 34-byte blocks of 32), as the
    memory plan counts them."""
    cfg = _cfg(12, 2, 128, None)
    per = {}
    for kv_dtype in ("f32", "f16", "q8_0"):
        c = _backend(1).new_cache(cfg, 1024, kv_dtype)
        per[kv_dtype] = (c.layers[0].k.nbytes + c.layers[0].v.nbytes) / 1024
        assert per[kv_dtype] == cfg.kv_cache_bytes(1024, kv_dtype) / 1024 == kv.bytes_per_token(cfg, kv_dtype)
    assert per == {"f32": 2048, "f16": 1024, "q8_0": 544}


def test_bad_kv_dtype_is_refused():
    b = _backend(1)
    with pytest.raises(InputError, match="kv_dtype='int4'"):
        b.new_cache(_cfg(4, 2, 32, None), 8, "int4")
    with pytest.raises(InputError, match="head_dim % 32"):
        b.new_cache(_cfg(4, 2, 16, None), 8, "q8_0")
    with pytest.raises(InputError, match="bf16"):
        b.new_cache(_cfg(4, 2, 32, None), 8, "bf16")
