"""Exercise every C entry point (all formats, prefill, decode, ring caches, growth, threads, variants,
bad input) so a sanitizer build can check them. Exits non-zero on any wrong result."""
from __future__ import annotations

import os

import numpy as np

from st_sdk.errors import InputError
from st_sdk.testing import check_backend
from st_sdk_backends.c import backend as cb
from st_sdk_backends.c.backend import CBackend


def _random_blocks(fmt: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes of `fmt`'s blocks with a small positive f16 scale in the first two bytes (iq4_nl,
    iq4_xs, which st-sdk cannot quantise)."""
    from st_sdk.weights.tensor import QUANT_SIZES

    block, size = QUANT_SIZES[fmt]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    data[:, :, :2] = np.full((rows, cols // block), 2e-3, np.float16)[..., None].view(np.uint8)
    return data.reshape(rows, -1)


def block_formats() -> None:
    """Every block format through linear (file layout and repacked, decode and prefill, every variant)
    and fused steps of small models that mix k-quants per tensor (llama.cpp's mixes)."""
    from st_sdk.backend import Param
    from st_sdk.loader import convert_params
    from st_sdk.loader import build_model as build
    from st_sdk.synth import preset_config, random_params
    from st_sdk.weights.tensor import WeightTensor, quantize
    from st_sdk_backends.c import ops

    _, lib = cb.ffi_lib()
    variants = [v for v, c in cb.ops.VARIANTS.items() if lib.st_cpu_supports(c)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    for fmt in ("q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"):
        data = _random_blocks(fmt, 24, 512, 1) if fmt.startswith("iq4") else quantize(fmt, x[:1].repeat(24, 0) * 0.1)
        t = WeightTensor("w", fmt, (24, 512), data)
        for variant in variants:
            cb.use_variant(variant)
            b = CBackend()
            b.is_available()
            for repack in (False, True):
                m = ops.CMat(t, repack_rows=repack and ops.can_repack(fmt, 24))
                for T in (1, 5):
                    assert np.isfinite(b.linear(x[:T], Param(t, m))).all()
    cb.use_variant(None)
    cfg = preset_config("tiny", layers=2, hidden_size=256, head_dim=128, num_attention_heads=2,
                        num_key_value_heads=1, moe_ffn_hidden_size=256)
    f32 = random_params(cfg, 0, "f32")
    ids = np.array([3, 17, 256, 99, 400, 12, 7, 311, 64, 128, 5], np.int64)
    for mix in ("q4_k_m", "q3_k_m", "q2_k", "q5_k_m"):
        params = convert_params(f32, mix, cfg)
        for variant in variants:
            cb.use_variant(variant)
            for threads in (1, 2):
                s = build(cfg, params, backend="c", n_threads=threads).session(capacity=4)
                s.feed(ids[:9], chunk=5)
                for t in ids[9:]:
                    s.feed([int(t)])
    cb.use_variant(None)


def sparse_layouts() -> None:
    """Sparse ReGLU's row-split up and neuron-major down (decode, prefill with four pairs an expert,
    blocks past the last eight), every variant, and the counters."""
    from st_sdk.backend import Param
    from st_sdk.weights.tensor import WeightTensor, quantize
    from st_sdk_backends.c import ops

    _, lib = cb.ffi_lib()
    rng = np.random.default_rng(2)
    E, F, H = 4, 96, 320
    for fmt in ("q4_0", "q8_0"):
        raw = {p: WeightTensor(p, fmt, s, quantize(fmt, 0.1 * rng.standard_normal(s).astype(np.float32)))
               for p, s in (("gate", (E, F, H)), ("up", (E, F, H)), ("down", (E, H, F)))}
        ps = (Param(raw["gate"], ops.CExperts(raw["gate"], repack_rows=True)),
              Param(raw["up"], ops.CExperts(raw["up"], row_split=True)),
              Param(raw["down"], ops.CExperts(raw["down"], neuron_major=True)))
        for variant in [v for v, c in cb.ops.VARIANTS.items() if lib.st_cpu_supports(c)]:
            cb.use_variant(variant)
            b = CBackend()
            b.is_available()
            for T in (1, 16):
                x = rng.standard_normal((T, H)).astype(np.float32)
                ids = np.stack([rng.permutation(E)[:2] for _ in range(T)]).astype(np.int64)
                assert np.isfinite(b.moe(x, *ps, ids, np.full((T, 2), 0.5, np.float32))).all()
    cb.use_variant(None)
    CBackend().sparsity(reset=True)


def main() -> None:
    report = check_backend(CBackend, formats=("f32", "f16", "bf16", "q8_0", "q4_0"))
    assert report.ok, str(report)
    block_formats()
    sparse_layouts()
    from st_sdk.synth import build_model

    ids = np.array([3, 17, 256, 99, 400, 12, 7, 311, 64, 128, 5, 460, 33], np.int64)
    _, lib = cb.ffi_lib()
    for variant in [v for v, c in cb.ops.VARIANTS.items() if lib.st_cpu_supports(c)]:
        cb.use_variant(variant)
        for fmt in ("f32", "q8_0", "q4_0"):
            for threads, layout in ((1, "off"), (2, "up+down"), (2, "auto")):
                os.environ["ST_C_SPARSE_LAYOUT"] = layout
                m = build_model("tiny", fmt=fmt, backend="c", n_threads=threads)
                s = m.session(capacity=4)
                s.feed(ids[:9], chunk=4)
                for t in ids[9:]:
                    s.feed([int(t)])
    os.environ.pop("ST_C_SPARSE_LAYOUT", None)
    b = CBackend()
    b.is_available()
    b.stage_seconds(reset=True)   # the stage clocks, and their bounds
    ffi, _ = cb.ffi_lib()
    assert lib.st_stage_seconds(ffi.new("double[]", 1), 1) == 1 and lib.st_stage_seconds(ffi.NULL, 4) < 0
    assert lib.st_stage_name(-1) == ffi.NULL and lib.st_stage_name(1 << 20) == ffi.NULL
    assert lib.st_stage_seconds_set(ffi.NULL, 1) < 0 and lib.st_sparse_stats_set(ffi.NULL, 1) < 0
    two = ffi.new("int64_t[]", list(range(1, 2 * lib.ST_SPARSE_STATS + 1)))
    back = ffi.new("int64_t[]", 3 * lib.ST_SPARSE_STATS)
    assert lib.st_sparse_stats_set(two, 2) == 0 and lib.st_sparse_stats(back, 3) == 3
    assert list(back) == list(two) + [0] * lib.ST_SPARSE_STATS   # the layers not given are zero
    for bad in (lambda: b.linear(np.zeros((1, 3), np.float32), None),
                lambda: b.embed(m.params.embed, [m.config.vocab_size])):
        try:
            bad()
        except (InputError, AttributeError):
            pass
    print("asan drive ok")


if __name__ == "__main__":
    main()
