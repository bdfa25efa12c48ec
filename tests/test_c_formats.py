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

from st_sdk.backend import Param
from st_sdk.errors import BackendError, InputError
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


@pytest.fixture(autouse=True)
def _automatic_variant():
    yield
    try:
        cbackend.use_variant(None)
    except BackendError:
        pass


def _variants() -> list[str]:
    try:
        _, lib = cops.ffi_lib()
    except BackendError:
        return ["generic"]
    return [v for v, code in cops.VARIANTS.items() if lib.st_cpu_supports(code)]


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
    if variant not in _variants():
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
    if variant not in _variants():
        pytest.skip(f"this CPU does not run the {variant} variant")
    cbackend.use_variant(variant)
    rows, cols = 24, 768
    w = random_blocks(fmt, rows, cols, seed=3)
    assert cops.can_repack(fmt, rows) and not cops.can_repack(fmt, rows + 4)
    x = np.random.default_rng(4).standard_normal((9, cols)).astype(np.float32)
    for T in (1, 4, 9):
        check_linear(fmt, w, rows, cols, x[:T], repack=True)


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
