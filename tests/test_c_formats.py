"""The C kernels for every block format beyond Q8_0/Q4_0 (q4_1, q5_0, q5_1, iq4_nl against Q8_0-style
activations; q2_k..q6_k, iq4_xs against Q8_K activations), checked on random blocks against gguf-py's
dequantisation: each output must equal the dot product of the dequantised weights with the dequantised
activations the kernel quantised, up to float summation order. Every variant this CPU runs, decode
(one token) and prefill (blocks of four tokens) shapes, the file layout and the 8-row repacked one.
Plus the k-quant quantisers (round trip, and against llama.cpp's when llama-cpp-python is installed)
and the fused step on small models that mix types per tensor."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import c_variants
from st_sdk.backend import Param
from st_sdk.errors import InputError
from st_sdk.testing import ConformanceSuite
from st_sdk.weights.tensor import QUANT_SIZES, WeightTensor, dequantize

from st_sdk_backends.c import backend as cbackend
from st_sdk_backends.c import ops as cops
from st_sdk_backends.c.backend import CBackend

NEW = ("q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")
KQ = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
#: byte offsets of each block's f16 scale fields (set to sane values; every other byte is random)
F16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "iq4_nl": (0,),
              "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "iq4_xs": (0,)}


def _available() -> CBackend:
    b = CBackend()
    if not b.is_available():
        pytest.skip(f"C backend unavailable: {b.unavailable_reason()}")
    return b


# tests that force a kernel variant put automatic selection back afterwards
pytestmark = pytest.mark.usefixtures("automatic_c_variant")


def random_blocks(fmt: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes in `fmt`'s layout, with the f16 scales set to small positive values."""
    block, size = QUANT_SIZES[fmt]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        data[:, :, off:off + 2] = rng.uniform(1e-3, 4e-3, (rows, cols // block)).astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(rows, -1)


def dequantised_activations(fmt: str, x: np.ndarray) -> np.ndarray:
    """x [T, cols] as the kernels see it: quantised for `fmt`'s weights, then back to float."""
    out = []
    for row in x:
        q = cops.quantize_act(fmt, row)
        out.append((q["d"][:, None].astype(np.float64) * q["qs"].astype(np.float64)).reshape(-1))
    return np.stack(out)


def check_linear(fmt: str, w: np.ndarray, rows: int, cols: int, x: np.ndarray, repack: bool) -> None:
    t = WeightTensor("w", fmt, (rows, cols), w)
    m = cops.CMat(t, repack_rows=repack)
    if repack:
        assert m.repacked == w.nbytes   # the repacked layout is exactly as large as the rows it holds
    b = CBackend()
    b.is_available()
    got = b.linear(x, Param(t, m))
    wd = dequantize(fmt, w, (rows, cols)).astype(np.float64)
    xd = dequantised_activations(fmt, x)
    want = xd @ wd.T
    bound = np.abs(xd) @ np.abs(wd).T
    err = np.abs(got - want) / bound
    assert err.max() < 2e-6, f"{fmt} repack={repack}: relative error {err.max():.2e}"


@pytest.mark.parametrize("fmt", NEW)
@pytest.mark.parametrize("variant", ["generic", "avx2", "avx512"])
def test_row_kernels_match_gguf(fmt, variant):
    """File layout (straight from the memory map): decode (T=1), prefill (T=5: four plus one)."""
    _available()
    if variant not in c_variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    cbackend.use_variant(variant)
    rows, cols = 13, 512
    w = random_blocks(fmt, rows, cols, seed=1)
    x = np.random.default_rng(2).standard_normal((5, cols)).astype(np.float32)
    for T in (1, 5):
        check_linear(fmt, w, rows, cols, x[:T], repack=False)


@pytest.mark.parametrize("fmt", ("q8_0", "q4_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"))
@pytest.mark.parametrize("variant", ["generic", "avx2", "avx512"])
def test_repacked_kernels_match_gguf(fmt, variant):
    """The 8-row repacked layout: dot8 (T=1) and gemm4 (T=4, T=9)."""
    _available()
    if variant not in c_variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    cbackend.use_variant(variant)
    rows, cols = 24, 768
    w = random_blocks(fmt, rows, cols, seed=3)
    assert cops.can_repack(fmt, rows) and not cops.can_repack(fmt, rows + 4)
    x = np.random.default_rng(4).standard_normal((9, cols)).astype(np.float32)
    for T in (1, 4, 9):
        check_linear(fmt, w, rows, cols, x[:T], repack=True)


@pytest.mark.parametrize("variant", ["generic", "avx2", "avx512"])
def test_repacked_q4_0_at_the_largest_integer_sums(variant):
    """Every nibble 15 against activations all at +-127 (and mixed with 0 nibbles): the largest integer
    sums a Q4_0 block makes, which the AVX2 kernels add up in int16 before widening."""
    _available()
    if variant not in c_variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    cbackend.use_variant(variant)
    rows, cols = 16, 768
    w = random_blocks("q4_0", rows, cols, seed=5).reshape(rows, cols // 32, 18)
    w[:8, :, 2:] = 0xFF                # rows 0-7: every nibble 15
    w[8:, :, 2:] = 0x0F                # rows 8-15: low nibbles 15, high 0
    x = np.ones((9, cols), np.float32)
    x[1::2] *= -1                      # tokens alternately +1 and -1: activations +127 or -127
    for T in (1, 4, 9):
        check_linear("q4_0", w.reshape(rows, -1), rows, cols, x[:T], repack=True)


@pytest.mark.parametrize("fmt", ("q8_0", "q4_0"))
def test_q8_0_and_q4_0_repacking_writes_the_documented_layout(fmt):
    """Per 8 rows and block: the 8 f16 scales, then word m of the quants of rows 0..7 at 16 + 32 m
    (csrc/st_formats.c), whichever code path this CPU takes (AVX2 where it has it)."""
    _available()
    bb, qb = {"q8_0": (34, 32), "q4_0": (18, 16)}[fmt]
    for rows, cols in ((8, 32), (16, 64), (768, 2560)):
        nb = cols // 32
        src = np.random.default_rng(rows).integers(0, 256, rows * nb * bb, dtype=np.uint8)
        out, _ = cops.repack(src, fmt, rows, cols)
        blocks = src.reshape(rows // 8, 8, nb, bb)
        scales = blocks[..., :2].transpose(0, 2, 1, 3).reshape(rows // 8, nb, 16)
        words = blocks[..., 2:].reshape(rows // 8, 8, nb, qb // 4, 4).transpose(0, 2, 3, 1, 4)
        want = np.concatenate([scales, words.reshape(rows // 8, nb, 8 * qb)], axis=-1).ravel()
        np.testing.assert_array_equal(np.asarray(out).ravel(), want)


def test_activation_quantisation_is_ggmls():
    """Q8_K: d = -max/127 signed by the element of largest magnitude, qs = round(x / d) <= 127, bsums
    over 16; the 32-blocks: d = amax/127, s = d * sum(qs)."""
    _available()
    rng = np.random.default_rng(5)
    x = rng.standard_normal(512).astype(np.float32)
    x[3] = -9.0   # the largest magnitude of the first block is negative
    q = cops.quantize_act("q4_k", x)
    iscale = np.float32(-127) / np.float32(-9.0)
    assert q["d"][0] == np.float32(1) / iscale
    np.testing.assert_array_equal(q["qs"][0], np.minimum(127, np.rint(iscale * x[:256])).astype(np.int8))
    np.testing.assert_array_equal(q["bsums"][0], q["qs"][0].astype(np.int32).reshape(16, 16).sum(1))
    q8 = cops.quantize_act("q5_0", x[:32])
    d = np.abs(x[:32]).max() / np.float32(127)
    assert abs(q8["d"][0] - d) <= 1e-7 * d and q8["s"][0] == np.float32(q8["d"][0] * q8["qs"][0].astype(np.int32).sum())
    zero = cops.quantize_act("q6_k", np.zeros(256, np.float32))
    assert zero["d"][0] == 0 and not zero["qs"].any() and not zero["bsums"].any()


# ---- the k-quant quantisers ------------------------------------------------------------------------
#: root-mean-square error of quantise -> dequantise over the data's RMS, for normal data (ggml's rates)
RMS_BOUND = {"q2_k": 0.40, "q3_k": 0.20, "q4_k": 0.10, "q5_k": 0.05, "q6_k": 0.025}


@pytest.mark.parametrize("fmt", KQ)
def test_quantize_rows_round_trips_through_gguf(fmt):
    _available()
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 2, (6, 1))).astype(np.float32)
    x[2, :256] = 0.0                                   # an all-zero super-block
    x[3, 256:] = np.linspace(-1, 3, 256)              # a one-signed ramp with a large min
    q = cops.quantize_rows(fmt, x)
    assert q.dtype == np.uint8 and q.shape == (6, 512 // 256 * QUANT_SIZES[fmt][1])
    back = dequantize(fmt, q, x.shape)
    assert not back[2, :256].any()
    rms = np.sqrt(np.mean((back - x) ** 2, axis=1) / np.mean(x ** 2 + 1e-12, axis=1))
    assert rms.max() < RMS_BOUND[fmt], rms
    np.testing.assert_array_equal(cops.quantize_rows(fmt, x), q)   # deterministic


def test_quantize_rows_validates():
    _available()
    with pytest.raises(InputError, match="q4_0"):
        cops.quantize_rows("q4_0", np.zeros((1, 256), np.float32))
    with pytest.raises(InputError, match="multiple of 256"):
        cops.quantize_rows("q4_k", np.zeros((2, 300), np.float32))
    with pytest.raises(InputError, match="floating"):
        cops.quantize_rows("q6_k", np.zeros((2, 256), np.int32))


def _llama_cpp_quantise(fmt: str, x: np.ndarray, tmp_path) -> np.ndarray:
    """What llama.cpp's quantiser (llama_model_quantize, no importance matrix) writes for x [256, 256]
    as one tensor of a small SmallThinker file (blk.0.attn_q)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    from st_sdk.synth import write_model
    from st_sdk.weights import open_model
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="f32", seed=0, hidden_size=256,
                       moe_ffn_hidden_size=256, head_dim=64, layers=1)["gguf"]
    name = "blk.0.attn_q.weight"
    r = gguf.GGUFReader(path, "r+")
    t = next(t for t in r.tensors if t.name == name)
    t.data[...] = x.reshape(t.data.shape)   # the file's map, written through
    r.data.flush()
    del r, t
    out = tmp_path / "q.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q2_k": 10, "q3_k": 12, "q4_k": 15, "q5_k": 17, "q6_k": 18}[fmt]   # LLAMA_FTYPE_MOSTLY_*
    params.pure = True
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), params) == 0
    q = open_model(out).get(name)
    assert q.fmt == fmt
    return np.asarray(q.data)


@pytest.mark.parametrize("fmt", KQ)
def test_quantize_rows_equals_llama_cpp(fmt, tmp_path):
    """Without an importance matrix llama.cpp runs ggml's reference quantisers: the same bytes."""
    _available()
    pytest.importorskip("llama_cpp")
    for i, scale in enumerate((0.02, 1.5)):
        x = np.random.default_rng(7 + i).standard_normal((256, 256)).astype(np.float32) * scale
        np.testing.assert_array_equal(cops.quantize_rows(fmt, x), _llama_cpp_quantise(fmt, x, tmp_path / str(i)))


class TestCConformanceNewFormats(ConformanceSuite):
    """The conformance kit on the new formats it can write (iq4_nl / iq4_xs have no quantiser here;
    their kernels are checked on random blocks above and in the fused step below)."""

    backend = CBackend
    formats = ("q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


# ---- the fused step on small models that mix types per tensor ---------------------------------------
IDS = (np.arange(13) * 37 + 5) % 512


def _iq4_blocks(x: np.ndarray, fmt: str) -> np.ndarray:
    """A simple nearest-level IQ4_NL / IQ4_XS encoding of x [rows, cols] (valid blocks for the tests;
    not llama.cpp's search)."""
    kv = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
    rows, cols = x.shape
    sub = x.reshape(rows, -1, 32)                                   # sub-blocks of 32
    amax = np.abs(sub).max(-1, keepdims=True) + 1e-12
    if fmt == "iq4_nl":
        d = (amax / 127).astype(np.float16)
        idx = np.abs(sub[..., None] / d.astype(np.float32)[..., None] - kv).argmin(-1).astype(np.uint8)
        qs = idx[..., :16] | (idx[..., 16:] << 4)
        return np.concatenate([d.view(np.uint8).reshape(rows, -1, 2), qs], -1).reshape(rows, -1)
    sb = sub.reshape(rows, -1, 8, 32)                               # super-blocks of 8 sub-blocks
    dj = amax.reshape(rows, -1, 8) / 127
    D = (dj.max(-1, keepdims=True) / 31).astype(np.float16)
    ls = np.clip(np.rint(dj / D.astype(np.float32)), 1, 31).astype(np.int32)   # stored ls + 32 in 0..63
    dl = D.astype(np.float32) * ls
    idx = np.abs(sb[..., None] / dl[..., None, None] - kv).argmin(-1).astype(np.uint8)
    qs = (idx[..., :16] | (idx[..., 16:] << 4)).reshape(rows, -1, 128)
    s6 = ls + 32
    sh = ((s6 >> 4) << (2 * np.arange(8))).sum(-1).astype(np.uint16)
    sl = (s6[..., 0::2] & 0xF) | ((s6[..., 1::2] & 0xF) << 4)
    return np.concatenate([D.view(np.uint8).reshape(rows, -1, 2), sh[..., None].view(np.uint8),
                           sl.astype(np.uint8), qs], -1).reshape(rows, -1)


def _wide_config():
    """tiny, widened so every row holds whole super-blocks of 256; every token takes all 8 experts (as
    the conformance kit does for lossy formats: rounding may otherwise flip a close top-k choice)."""
    from st_sdk.synth import preset_config

    return preset_config("tiny", hidden_size=256, head_dim=128, num_attention_heads=2, num_key_value_heads=1,
                         moe_ffn_hidden_size=256, moe_num_active_primary_experts=8)


def _mixed_params(cfg, mix: str):
    """Random f32 weights stored with llama.cpp's mix `mix`, or ("iq4") IQ4_NL attention, IQ4_XS experts
    and a Q6_K down projection."""
    from st_sdk.backend import LayerParams, ModelParams
    from st_sdk.loader import convert_params
    from st_sdk.synth import random_params

    params = random_params(cfg, 0, "f32")
    if mix != "iq4":
        return convert_params(params, mix, cfg)

    def conv(p, fmt):
        t = p.raw
        if t.parts is not None:
            return Param(WeightTensor.stack(t.name, [conv(Param(q), fmt).raw for q in t.parts]))
        data = cops.quantize_rows(fmt, t.numpy()) if fmt == "q6_k" else _iq4_blocks(t.numpy(), fmt)
        return Param(WeightTensor(t.name, fmt, t.shape, data))

    fmts = {"wq": "iq4_nl", "wk": "iq4_nl", "wv": "iq4_xs", "wo": "iq4_nl", "gate": "iq4_xs", "up": "iq4_xs",
            "down": "q6_k"}
    layers = [LayerParams(**{f: conv(getattr(lp, f), fmts[f]) if f in fmts else getattr(lp, f)
                             for f in lp.__dataclass_fields__}) for lp in params.layers]
    return ModelParams(embed=conv(params.embed, "iq4_xs"), layers=layers, norm=params.norm,
                       head=conv(params.head, "q6_k"))


def _run(cfg, params, backend="c", **kw):
    """Logits of a 9-token prefill (two blocks of four and one) then 4 decode steps."""
    from st_sdk.loader import build_model

    m = build_model(cfg, params, backend=backend, **kw)
    if backend == "numpy":
        return m, m.logits(IDS)
    s = m.session()
    return m, np.concatenate([s.feed(IDS[:9], all_logits=True), np.stack([s.feed([int(t)]) for t in IDS[9:]])])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


MIXES = ("q4_k_m", "q3_k_m", "q2_k", "q6_k", "q5_k_m", "q4_k_s", "iq4")


@pytest.fixture(scope="module")
def mixed():
    cfg = _wide_config()
    return cfg, {mix: _mixed_params(cfg, mix) for mix in MIXES}


@pytest.mark.parametrize("mix", MIXES)
def test_fused_step_on_mixed_types_matches_reference(mixed, mix, monkeypatch):
    """Prefill and decode through the fused step (repacked and from the file layout) agree with the
    NumPy reference on the same weights. The two layouts compute the same integer dot products (checked
    exactly per op above), but a float summation order that differs in the last bit can flip the
    rounding of one 8-bit activation downstream, which moves the logits by ~1e-3 of their range."""
    _available()
    cfg, all_params = mixed
    params = all_params[mix]
    types = {p.raw.fmt for _, p in params.all()}
    assert len(types - {"f32"}) >= (1 if mix == "q6_k" else 2), types
    _, want = _run(cfg, params, backend="numpy")
    m, got = _run(cfg, params)
    assert _rel(got, want) < 5e-2, f"{mix}: {_rel(got, want):.3g}"
    if m.backend.describe()["variant"] != "generic":
        assert m.backend.describe()["repacked_weight_bytes"] > 0
    monkeypatch.setenv("ST_C_REPACK", "0")
    m0, in_place = _run(cfg, params)
    assert m0.backend.describe()["repacked_weight_bytes"] == 0
    assert _rel(in_place, got) < 2e-2


@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_m", "iq4"])
def test_mixed_types_every_variant_and_thread_count_agree(mixed, mix):
    _available()
    cfg, all_params = mixed
    results = {}
    for v in c_variants():
        cbackend.use_variant(v)
        results[v] = _run(cfg, all_params[mix], n_threads=1)[1]
    for v, got in results.items():   # generic runs the file layout, the others the repacked one
        assert _rel(got, results["generic"]) < 2e-2, f"{v} differs from generic on {mix}"
    cbackend.use_variant(None)
    np.testing.assert_array_equal(_run(cfg, all_params[mix], n_threads=2)[1], results[c_variants()[-1]])


@pytest.mark.parametrize("fmts", [("q4_k", "q4_k", "q6_k"), ("q3_k", "q2_k", "q5_k"), ("iq4_xs", "q4_k", "q8_0"),
                                  ("q5_0", "q4_1", "iq4_nl")])
def test_moe_with_gate_up_down_in_different_formats(fmts):
    """The sparse ReGLU expert op with each of gate, up and down in its own format, sparse and dense,
    repacked and not, against the reference."""
    b = _available()
    from st_sdk_backends.numpy import ops as ref

    H, F, E, T, k = 256, 256, 4, 6, 2
    rng = np.random.default_rng(11)
    raw = {}
    for part, fmt, shape in zip(("gate", "up", "down"), fmts, ((E, F, H), (E, F, H), (E, H, F))):
        x = (rng.standard_normal(shape) / 16).astype(np.float32).reshape(-1, shape[-1])
        data = _iq4_blocks(x, fmt) if fmt.startswith("iq4") else \
            cops.quantize_rows(fmt, x) if fmt in KQ else cops_quantize(fmt, x)
        raw[part] = WeightTensor(part, fmt, shape, data.reshape(E, shape[1], -1))
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, k)).astype(np.float32)
    want = ref.moe(x, *(Param(raw[p]) for p in ("gate", "up", "down")), ids, w)
    for repack in (False, True):
        ps = [Param(raw[p], b.prepare(Param(raw[p]), p) if repack else cops.CExperts(raw[p])) for p in ("gate", "up", "down")]
        sparse = b.moe(x, *ps, ids, w, sparse=True)
        np.testing.assert_array_equal(sparse, b.moe(x, *ps, ids, w, sparse=False))
        assert _rel(sparse, want) < 2e-2, f"{fmts} repack={repack}: {_rel(sparse, want):.3g}"


def cops_quantize(fmt, x):
    from st_sdk.weights.tensor import quantize

    return quantize(fmt, x)


def test_mixed_k_quants_under_a_memory_budget(tmp_path, monkeypatch):
    """Experts read from the file layout through the expert cache (per-row k-quant kernels, q6_k and
    q4_k downs in different layers) give the resident model's logits."""
    _available()
    import st_sdk
    from st_sdk.cli import main as cli
    from st_sdk.offload import experts as offload_experts
    from st_sdk.synth import write_model

    monkeypatch.setattr(offload_experts, "process_baseline_bytes", lambda: 0)
    monkeypatch.setattr(offload_experts, "headroom_bytes", lambda budget: 0)
    f32 = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="f32", seed=0, hidden_size=256,
                      head_dim=128, num_attention_heads=2, num_key_value_heads=1, moe_ffn_hidden_size=256)["gguf"]
    path = tmp_path / "q4_k_m.gguf"
    assert cli(["quantize", str(f32), str(path), "--type", "q4_k_m"]) == 0
    want = st_sdk.load(path, backend="c", n_threads=1).logits(IDS)
    p = st_sdk.load(path, backend="c", n_threads=1, max_memory="64GiB").memory_plan
    assert p.smallest_expert_bytes < p.expert_bytes   # q4_k vs q6_k ffn_down
    budget = p.dense_bytes + p.kv_bytes + p.scratch_bytes + (6 + -(-p.converted_bytes // p.expert_bytes)) * p.expert_bytes
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget)
    got = m.logits(IDS)
    assert m.offload.stats.evictions > 0
    assert _rel(got, want) < 1e-5


def test_long_prefill_shares_its_q8k_copies(mixed):
    """A prefill long enough that the Q8_K copies of the attention output and of the expert activations
    are split across threads (more than 65536 values) instead of made by each thread for itself."""
    _available()
    from st_sdk.loader import build_model

    cfg, all_params = mixed
    ids = (np.arange(300) * 53 + 11) % cfg.vocab_size
    want = build_model(cfg, all_params["q4_k_m"], backend="numpy").logits(ids)
    for threads in (1, 2):
        got = build_model(cfg, all_params["q4_k_m"], backend="c", n_threads=threads).logits(ids)
        assert _rel(got, want) < 5e-2, f"{threads} threads: {_rel(got, want):.3g}"


def test_rarer_types_are_converted_at_load_and_reported(mixed):
    """A type the kernels do not run (here iq2_xxs, random blocks) is dequantised at load and re-stored
    as q8_0; describe() and the selection report say so, and the model matches the reference."""
    _available()
    from st_sdk.backend import LayerParams, ModelParams
    from st_sdk.loader import build_model

    cfg, all_params = mixed
    params = all_params["q4_k_m"]
    wq = params.layers[1].wq.raw
    data = np.random.default_rng(12).integers(0, 256, (wq.shape[0], wq.shape[1] // 256, 66), dtype=np.uint8)
    data[..., :2] = np.full(data.shape[:2], 1e-3, np.float16)[..., None].view(np.uint8)
    odd = WeightTensor(wq.name, "iq2_xxs", wq.shape, data.reshape(wq.shape[0], -1))
    layers = list(params.layers)
    layers[1] = LayerParams(**{**{f: getattr(layers[1], f) for f in layers[1].__dataclass_fields__}, "wq": Param(odd)})
    params = ModelParams(embed=params.embed, layers=layers, norm=params.norm, head=params.head)
    m = build_model(cfg, params, backend="c")
    assert "iq2_xxs" in CBackend.converts and "iq2_xxs" not in CBackend.formats
    d = m.backend.describe()
    assert d["converted"].startswith("iq2_xxs -> q8_0") and d["extra_resident_bytes"] > 0
    assert "converts iq2_xxs at load" in m.selection.explain()
    want = build_model(cfg, params, backend="numpy").logits(IDS)
    assert _rel(m.logits(IDS), want) < 5e-2
    with pytest.raises(InputError, match="iq2_xxs"):
        cops.CMat(odd)   # the kernels themselves never see it
    with pytest.raises(InputError, match="quantize_act"):
        cops.quantize_act("f32", np.zeros(32, np.float32))
