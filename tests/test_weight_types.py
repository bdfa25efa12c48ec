"""Every GGUF weight type: storage sizes, dequantisation through gguf-py, reading from a file."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from st_sdk.errors import WeightError  # noqa: E402
from st_sdk.weights.gguf_file import GGUFModelFile, GGUFWriterStream  # noqa: E402
from st_sdk.weights.tensor import (FORMATS, QUANT_SIZES, WeightTensor, block_size, dequantize,  # noqa: E402
                                   quantize, row_bytes, storage_shape)


def _random_storage(fmt: str, shape, seed: int = 0) -> np.ndarray:
    """Random blocks whose f16 fields are finite: random bytes, then every 2-byte field that decodes
    to inf/NaN replaced (a real file has none)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, storage_shape(fmt, shape), dtype=np.uint8)
    halves = data.reshape(-1)[: data.size // 2 * 2].view(np.uint16)
    halves[(halves & 0x7C00) == 0x7C00] &= 0x3FFF   # exponent all ones -> a finite half
    return data


def test_sizes_are_gguf_sizes():
    for fmt, sizes in QUANT_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.upper()]] == sizes, fmt
    # every type gguf-py dequantises is a format here
    readable = {t.name.lower() for t in gguf.GGMLQuantizationType
                if t.name.lower() not in ("f64", "i8", "i16", "i32", "i64")
                and _dequantises(t)}
    assert readable <= set(FORMATS), readable - set(FORMATS)


def _dequantises(t) -> bool:
    block, size = gguf.GGML_QUANT_SIZES[t]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), t)
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in QUANT_SIZES])
def test_dequantise_every_type_as_gguf_does(fmt):
    shape = (3, 2 * max(block_size(fmt), 32))
    data = _random_storage(fmt, shape)
    w = WeightTensor("w", fmt, shape, data)
    got = w.numpy()
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[fmt.upper()]).reshape(shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()
    assert row_bytes(fmt, shape[1]) == data.shape[1]
    # a stacked expert tensor slices per expert
    s = WeightTensor("s", fmt, (2, *shape), np.stack([data, data]))
    np.testing.assert_array_equal(s.expert(1).numpy(), want)


def test_storage_shape_checks_the_row_length():
    with pytest.raises(WeightError, match="q4_k needs the last dimension to be a multiple of 256"):
        storage_shape("q4_k", (4, 128))
    with pytest.raises(WeightError, match="does not match q6_k"):
        WeightTensor("w", "q6_k", (2, 256), np.zeros((2, 200), np.uint8))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_quantize_uses_gguf(fmt):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    q = quantize(fmt, x)
    np.testing.assert_array_equal(q, gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt.upper()]))
    assert np.abs(dequantize(fmt, q, x.shape) - x).max() < 0.25


def test_quantize_refuses_what_nobody_here_writes():
    with pytest.raises(WeightError, match="iq2_xxs.*llama-quantize"):
        quantize("iq2_xxs", np.zeros((1, 256), np.float32))
    with pytest.raises(WeightError, match="'q7_0'"):
        quantize("q7_0", np.zeros((1, 256), np.float32))


def test_gguf_file_holds_every_type(tmp_path):
    specs, datas = {}, {}
    for i, fmt in enumerate(FORMATS):
        shape = (2, 3, max(block_size(fmt), 32) * 2) if i % 2 else (5, max(block_size(fmt), 32))
        specs[f"t.{fmt}"] = (fmt, shape)
        if fmt in QUANT_SIZES:
            datas[fmt] = _random_storage(fmt, shape, seed=i)
        else:
            datas[fmt] = quantize(fmt, np.random.default_rng(i).standard_normal(shape).astype(np.float32))
    w = GGUFWriterStream(tmp_path / "all.gguf", {"general.name": "types"}, specs)
    for fmt in FORMATS:
        w.write(f"t.{fmt}", None, datas[fmt])
    w.close()
    g = GGUFModelFile(tmp_path / "all.gguf")
    for fmt in FORMATS:
        t = g.get(f"t.{fmt}")
        assert (t.fmt, t.shape) == specs[f"t.{fmt}"]
        np.testing.assert_array_equal(t.data, datas[fmt])
        assert t.nbytes == datas[fmt].nbytes
    # gguf-py's own reader agrees on every type and shape
    r = gguf.GGUFReader(tmp_path / "all.gguf")
    for t in r.tensors:
        assert t.tensor_type.name.lower() == t.name[2:]
        assert tuple(int(d) for d in reversed(t.shape)) == specs[t.name][1]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_torch_and_jax_convert_every_type_as_gguf_dequantises(backend):
    """What torch and jax hold after load is gguf-py's dequantisation of the stored blocks, for every
    type (stacked experts included)."""
    pytest.importorskip(backend)
    from st_sdk.backend import Param

    for fmt in QUANT_SIZES:
        shape = (2, 3, 2 * max(block_size(fmt), 32))
        data = _random_storage(fmt, shape, seed=len(fmt))
        t = WeightTensor("w", fmt, shape, data)
        want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[fmt.upper()]).reshape(shape)
        if backend == "torch":
            from st_sdk_backends.torch.backend import TorchBackend

            tb = TorchBackend(dtype="float32")
            tb.setup()
            got = tb.prepare(Param(t), "gate").numpy()
        else:
            from st_sdk_backends.jax import ops

            got = ops.convert(t, "float32")
        np.testing.assert_array_equal(got, want, err_msg=fmt)
