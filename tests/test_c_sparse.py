"""Sparse ReGLU in the C backend (csrc/st_sparse_impl.h): an up projection stored row-split and a down
projection stored neuron-major, so that a neuron whose relu(gate) is zero costs neither its up row nor
its down column. The skipped neurons add exactly 0 to the integer block sums, so the sparse path equals
the dense one up to float summation order (1e-5 x max|value| here), on every kernel variant, with any
thread count; and the counters (Backend.sparsity) report what was read.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import c_variants, rel_err
from st_sdk.backend import Param
from st_sdk.testing import ConformanceSuite
from st_sdk.weights.tensor import WeightTensor, quantize

from st_sdk_backends.c import backend as cbackend
from st_sdk_backends.c import ops as cops
from st_sdk_backends.c.backend import CBackend

SPARSE_FORMATS = ("q4_0", "q8_0")   # row-split up and neuron-major down
NM_KQUANTS = ("q4_k", "q6_k")        # neuron-major down (up keeps the file layout: its rows are read alone)


def _available(n_threads: int | None = None) -> CBackend:
    b = CBackend(n_threads=n_threads)
    if not b.is_available():
        pytest.skip(f"C backend unavailable: {b.unavailable_reason()}")
    b.setup()
    return b


# tests that force a kernel variant put automatic selection back afterwards
pytestmark = pytest.mark.usefixtures("automatic_c_variant")


def _experts(fmt: str, H: int, F: int, E: int, seed: int = 0) -> dict[str, WeightTensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for part, shape in (("gate", (E, F, H)), ("up", (E, F, H)), ("down", (E, H, F))):
        x = (rng.standard_normal(shape) / np.sqrt(shape[2])).astype(np.float32)
        out[part] = WeightTensor(f"ffn_{part}_exps", fmt, shape, quantize(fmt, x))
    return out


def _layouts(raw: dict[str, WeightTensor], sparse: bool) -> tuple[Param, Param, Param]:
    """Sparse: repacked gate, row-split up, neuron-major down; dense: all three in the file layout."""
    kw = ({"repack_rows": True}, {"row_split": True}, {"neuron_major": True}) if sparse else ({}, {}, {})
    return tuple(Param(raw[p], cops.CExperts(raw[p], **k)) for p, k in zip(("gate", "up", "down"), kw))


def _inputs(T: int, H: int, E: int, k: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, k)).astype(np.float32)
    return x, ids, w


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
@pytest.mark.parametrize("H", [64, 320, 1536])   # 320: blocks past the last eight; 1536: the 4b-a0.6b width
@pytest.mark.parametrize("T", [1, 6, 16])   # 16: four pairs an expert (prefill)
def test_sparse_layouts_equal_the_dense_path(fmt, H, T):
    """Row-split up and neuron-major down give the file layout's result up to float summation order,
    on every variant; whether dead neurons are skipped (sparse=) changes nothing at all."""
    b = _available()
    E, F, k = 4, 128, 2
    raw = _experts(fmt, H, F, E)
    x, ids, w = _inputs(T, H, E, k)
    for variant in c_variants():
        cbackend.use_variant(variant)
        dense = b.moe(x, *_layouts(raw, False), ids, w, sparse=False)
        sparse = _layouts(raw, True)
        got = b.moe(x, *sparse, ids, w, sparse=True)
        assert rel_err(got, dense) < 1e-5, f"{variant}: {rel_err(got, dense):.3g}"
        np.testing.assert_array_equal(got, b.moe(x, *sparse, ids, w, sparse=False))


@pytest.mark.parametrize("fmt", NM_KQUANTS)
@pytest.mark.parametrize("H,F", [(256, 256), (1536, 768)])   # 1536 x 768: the 4b-a0.6b expert
@pytest.mark.parametrize("T", [1, 6, 16])
def test_kquant_neuron_major_down_equals_the_dense_path(fmt, H, F, T):
    """Q4_K's and Q6_K's neuron-major down (super-block scales and mins per row, Q6_K's top bits as a
    second plane) gives the file layout's result up to float summation order, on every variant, and
    skipping dead neurons changes nothing at all. Gate and up are laid out alike on both sides: z then
    agrees to the bit, so its quantisation (Q8_K, whose rounding one float ulp can flip) is the same."""
    b = _available()
    raw = _experts(fmt, H, F, 4)
    x, ids, w = _inputs(T, H, 4, 2)
    sparse = _layouts(raw, True)
    assert [p.value.layout for p in sparse] == ["repacked", "file", "neuron_major"]
    file_down = (*sparse[:2], Param(raw["down"], cops.CExperts(raw["down"])))
    for variant in c_variants():
        cbackend.use_variant(variant)
        dense = b.moe(x, *file_down, ids, w, sparse=False)
        got = b.moe(x, *sparse, ids, w, sparse=True)
        assert rel_err(got, dense) < 1e-5, f"{variant}: {rel_err(got, dense):.3g}"
        np.testing.assert_array_equal(got, b.moe(x, *sparse, ids, w, sparse=False))


def test_kquant_neuron_major_layout_holds_the_file_values():
    """The converted copy is a permutation of the file's bytes into columns: dequantising a column
    back (Q6_K: nibble and top planes; Q4_K: its d, dmin, scales and mins) gives the file's values."""
    from gguf import GGMLQuantizationType, quants

    _available()
    H, F = 256, 512
    for fmt, qt in (("q4_k", GGMLQuantizationType.Q4_K), ("q6_k", GGMLQuantizationType.Q6_K)):
        down = _experts(fmt, H, F, 1)["down"]
        want = quants.dequantize(down.data.reshape(H, -1), qt).reshape(H, F)
        nm = cops.CExperts(down, neuron_major=True).arrays[0]
        assert nm.nbytes == down.nbytes
        ns = F // 256
        d = nm[:ns * H * 2].view(np.float16).astype(np.float32).reshape(ns, H)
        if fmt == "q6_k":
            sc = nm[ns * H * 2:ns * H * 18].view(np.int8).astype(np.float32).reshape(F // 16, H)
            cols = nm[ns * H * 18:].reshape(F, H // 2 + H // 4)
            lo = np.concatenate([cols[:, :H // 2].reshape(F, -1, 32) & 15, cols[:, :H // 2].reshape(F, -1, 32) >> 4],
                                axis=2).reshape(F, H)
            top = cols[:, H // 2:].reshape(F, -1, 16)
            hi = np.concatenate([(top >> (2 * k)) & 3 for k in range(4)], axis=2).reshape(F, H)
            q = (lo | hi << 4).astype(np.float32) - 32
            got = (q * np.repeat(sc, 16, axis=0) * np.repeat(d, 256, axis=0)).T
        else:
            dmin = nm[ns * H * 2:ns * H * 4].view(np.float16).astype(np.float32).reshape(ns, H)
            top = nm[ns * H * 4:ns * H * 8].view(np.uint32).reshape(ns, H)
            low = nm[ns * H * 8:ns * H * 16].reshape(ns * 8, H).astype(np.uint32)
            j = np.arange(ns * 8)[:, None] % 8
            sc = (low & 15) | ((np.repeat(top, 8, axis=0) >> (4 * j)) & 3) << 4
            mn = (low >> 4) | ((np.repeat(top, 8, axis=0) >> (4 * j + 2)) & 3) << 4
            cols = nm[ns * H * 16:].reshape(F, H // 2)
            q = np.concatenate([cols.reshape(F, -1, 32) & 15, cols.reshape(F, -1, 32) >> 4], axis=2).reshape(F, H)
            dd, dm = np.repeat(d, 256, axis=0), np.repeat(dmin, 256, axis=0)
            got = (dd * np.repeat(sc, 32, axis=0) * q - dm * np.repeat(mn, 32, axis=0)).T
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", SPARSE_FORMATS + NM_KQUANTS)
def test_sparse_layouts_give_the_same_result_with_any_thread_count(fmt):
    """Rows of down are split between threads, never summed across them. Three threads split the 512
    rows as 192, 192 and 128: the AVX-512 down kernel's steps of 128 rows end in half a step there."""
    raw = _experts(fmt, 512, 256, 4)
    x, ids, w = _inputs(3, 512, 4, 2)
    ps = _layouts(raw, True)
    want = _available(1).moe(x, *ps, ids, w)
    for threads in (2, 3):
        b = _available(2)
        b.threads = threads   # past the cores the backend would take on a 2-core machine: the C pool runs any number
        np.testing.assert_array_equal(b.moe(x, *ps, ids, w), want, err_msg=f"{threads} threads")


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_a_file_layout_gate_next_to_a_row_split_up(fmt):
    """A gate that is not repacked (generic kernels, or a type without the 8-row layout) still runs
    with a row-split up."""
    b = _available()
    raw = _experts(fmt, 320, 96, 4)
    x, ids, w = _inputs(5, 320, 4, 2)
    want = b.moe(x, *_layouts(raw, False), ids, w)
    ps = (Param(raw["gate"], cops.CExperts(raw["gate"])), Param(raw["up"], cops.CExperts(raw["up"], row_split=True)),
          Param(raw["down"], cops.CExperts(raw["down"], neuron_major=True)))
    assert rel_err(b.moe(x, *ps, ids, w), want) < 1e-5


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0"])
@pytest.mark.parametrize("T", [1, 16])
def test_sparse_up_of_other_types_reads_live_rows_of_the_file_layout(fmt, T):
    """Where a type has no row-split kernels (the k-quants) or the width is not a multiple of 64,
    `up` keeps the file's layout next to the repacked gate, and only live neurons' rows are read:
    the dense result up to float summation order, on every variant."""
    b = _available()
    H, F = (256, 256) if fmt != "q8_0" else (96, 128)
    raw = _experts(fmt, H, F, 4)
    x, ids, w = _inputs(T, H, 4, 2)
    for variant in c_variants():
        cbackend.use_variant(variant)
        dense = b.moe(x, *_layouts(raw, False), ids, w, sparse=False)
        gate = cops.CExperts(raw["gate"], repack_rows=True)
        up = cops.CExperts(raw["up"], repack_rows=True, row_split=True)
        assert up.layout == "file"
        ps = (Param(raw["gate"], gate), Param(raw["up"], up), Param(raw["down"], cops.CExperts(raw["down"])))
        assert rel_err(b.moe(x, *ps, ids, w, sparse=True), dense) < 1e-5, variant


def test_layouts_keep_their_size_and_fall_back_where_they_do_not_apply():
    """A sparse copy has the file's bytes (counted as repacked); a width that is not a multiple of 64,
    or a type without sparse kernels, stays in the file layout."""
    _available()
    raw = _experts("q4_0", 128, 64, 2)
    nm = cops.CExperts(raw["down"], neuron_major=True)
    rs = cops.CExperts(raw["up"], row_split=True)
    assert (nm.layout, rs.layout) == ("neuron_major", "row_split")
    assert nm.repacked == raw["down"].nbytes and rs.repacked == raw["up"].nbytes
    odd = _experts("q4_0", 96, 64, 2)
    assert cops.CExperts(odd["down"], neuron_major=True).layout == "file"
    assert cops.CExperts(odd["up"], row_split=True).layout == "file"
    k = _experts("q5_k", 256, 256, 2)
    assert cops.CExperts(k["down"], neuron_major=True).layout == "file"
    k = _experts("q4_k", 256, 256, 2)
    nm = cops.CExperts(k["down"], neuron_major=True)
    assert nm.layout == "neuron_major" and nm.repacked == k["down"].nbytes


#: the tiny preset widened to the k-quants' 256-element super-blocks (else they fall back to q5_0)
KQUANT_SHAPE = dict(hidden_size=256, moe_ffn_hidden_size=256, head_dim=64)


def _model(tmp_path, fmt: str, monkeypatch, **env):
    import st_sdk
    from st_sdk.synth import write_model

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    shape = KQUANT_SHAPE if fmt in NM_KQUANTS else {}
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype=fmt, seed=0, **shape)["gguf"]
    return st_sdk.load(path, backend="c")


IDS = np.array([3, 17, 256, 99, 400, 12, 7, 311, 64, 128, 5, 460, 33, 2], np.int64)


@pytest.mark.parametrize("fmt", SPARSE_FORMATS + NM_KQUANTS)
def test_whole_model_logits_sparse_and_dense(tmp_path, monkeypatch, fmt):
    """The same file's logits with sparse ReGLU off (ST_C_SPARSE=0), with the default (repacked up and
    down, skipping 8 dead neurons in a row), with the row-split up and with the neuron-major down too."""
    _available()
    dense = _model(tmp_path, fmt, monkeypatch, ST_C_SPARSE="0")
    assert dense.backend.describe()["sparse_reglu"] is False
    want = dense.logits(IDS)
    for layout in ("off", "up", "up+down"):
        m = _model(tmp_path, fmt, monkeypatch, ST_C_SPARSE="1", ST_C_SPARSE_LAYOUT=layout)
        assert m.backend.describe()["sparse_layout"] == layout
        assert rel_err(m.logits(IDS), want) < 1e-5, layout


def test_an_unknown_sparse_layout_is_refused(monkeypatch):
    from st_sdk.errors import BackendError

    monkeypatch.setenv("ST_C_SPARSE_LAYOUT", "down")
    b = CBackend()
    with pytest.raises(BackendError, match="ST_C_SPARSE_LAYOUT='down'"):
        b.setup()


def test_sparsity_counters(tmp_path, monkeypatch):
    """Backend.sparsity: live neurons per layer and the expert bytes read, per token; a dense layout
    reads the dense bytes, the sparse ones less, the neuron-major down less again."""
    _available()
    seen = {}
    for name, env in (("dense", {"ST_C_SPARSE": "0"}), ("row-split", {"ST_C_SPARSE": "1", "ST_C_SPARSE_LAYOUT": "up"}),
                      ("neuron-major", {"ST_C_SPARSE": "1", "ST_C_SPARSE_LAYOUT": "up+down"})):
        m = _model(tmp_path, "q4_0", monkeypatch, **env)
        m.backend.sparsity(reset=True)
        s = m.session(capacity=32)
        for t in IDS:
            s.feed([int(t)])
        st = m.backend.sparsity(reset=True)
        assert st["tokens"] == len(IDS)
        assert len(st["layer_live_fraction"]) == m.config.num_hidden_layers
        assert all(0.0 < f < 1.0 for f in st["layer_live_fraction"])
        assert 0.0 < st["live_fraction"] < 1.0
        seen[name] = st
        assert m.backend.sparsity() is None   # reset
    assert seen["dense"]["expert_bytes_per_token"] == seen["dense"]["dense_expert_bytes_per_token"]
    assert seen["row-split"]["expert_bytes_per_token"] < seen["dense"]["expert_bytes_per_token"]
    assert seen["neuron-major"]["expert_bytes_per_token"] < seen["row-split"]["expert_bytes_per_token"]
    # the down projection's share: a third of the dense bytes (gate, up, down alike in Q4_0) until the
    # neuron-major layout skips dead columns; the row-split up saves only in gate/up
    third = pytest.approx(seen["dense"]["dense_expert_bytes_per_token"] / 3, rel=1e-12)
    assert seen["dense"]["down_bytes_per_token"] == third and seen["row-split"]["down_bytes_per_token"] == third
    assert seen["neuron-major"]["down_bytes_per_token"] < third.expected * 0.9
    gate_up = {k: v["expert_bytes_per_token"] - v["down_bytes_per_token"] for k, v in seen.items()}
    assert gate_up["neuron-major"] == pytest.approx(gate_up["row-split"], rel=0.01)   # live neurons as below
    # the same tokens and weights: the same neurons live whatever the layout (up to a sign a
    # different float summation order may flip)
    assert abs(seen["dense"]["live_fraction"] - seen["neuron-major"]["live_fraction"]) < 0.01


def test_generate_stats_prints_the_counters(tmp_path, capsys, monkeypatch):
    from st_sdk.cli import main
    from st_sdk.synth import write_model

    _available()
    monkeypatch.setenv("ST_C_SPARSE_LAYOUT", "up+down")
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=0)["gguf"]
    assert main(["generate", str(path), "-p", "hello", "-n", "8", "--backend", "c", "--stats",
                 "--temperature", "1"]) == 0
    err = capsys.readouterr().err
    assert "sparse ReGLU:" in err and "of expert neurons live" in err and "MB per token" in err


class TestCConformanceNeuronMajor(ConformanceSuite):
    """The conformance kit with the sparse layouts (row-split up, neuron-major down)."""

    class backend(CBackend):
        name = "c-sparse-layouts"

        def __init__(self, n_threads=None, dtype=None):
            super().__init__(n_threads, dtype)
            self.sparse_layout = "up+down"

    formats = SPARSE_FORMATS + NM_KQUANTS


def _trained_tiny(tmp_path, fmt: str = "q4_0"):
    """The tiny preset with 8 layers and the trained model's routing: shares of live neurons that differ
    from layer to layer (5-30%), in a width the sparse layouts take."""
    from st_sdk.synth import write_model

    shape = KQUANT_SHAPE if fmt in NM_KQUANTS else {}
    return write_model(tmp_path, preset="tiny", layers=8, formats=("gguf",), dtype=fmt, seed=0,
                       routing="trained", **shape)["gguf"]


def _with_sparse_layouts() -> CBackend:
    b = _available()
    if not b._repacking():
        pytest.skip("the sparse layouts need a SIMD variant")
    return b


def test_auto_chooses_each_layers_layout_from_its_live_share(tmp_path, monkeypatch):
    """ST_C_SPARSE_LAYOUT=auto (the default): each layer's live share is measured at load, and its up and
    down take the sparse layouts below ST_C_SPARSE_LIVE, the repacked one above; the logits stay the
    dense path's."""
    import st_sdk

    _with_sparse_layouts()
    path = _trained_tiny(tmp_path)
    monkeypatch.delenv("ST_C_SPARSE_LAYOUT", raising=False)
    first = st_sdk.load(path, backend="c")
    shares = first.backend.load_live_shares
    assert len(shares) == 8 and all(0.0 < s < 1.0 for s in shares)
    threshold = float(np.median(shares))
    monkeypatch.setenv("ST_C_SPARSE_LIVE", repr(threshold))
    m = st_sdk.load(path, backend="c")
    assert m.backend.load_live_shares == shares   # the same seeded tokens at every load
    want = ["up+down" if s < threshold else "off" for s in shares]
    assert m.backend.layer_layouts == want and "up+down" in want and "off" in want
    for lp, layout in zip(m.params.layers, want):
        sparse = layout == "up+down"
        assert (lp.gate.value.layout, lp.up.value.layout, lp.down.value.layout) == \
            ("repacked", "row_split" if sparse else "repacked", "neuron_major" if sparse else "repacked")
    n = want.count("up+down")
    assert m.backend.describe()["sparse_layout"] == \
        f"auto: up+down in {n} of 8 layers (live < {threshold:.0%}), off in {8 - n}"
    monkeypatch.setenv("ST_C_SPARSE", "0")
    dense = st_sdk.load(path, backend="c")
    assert rel_err(m.logits(IDS), dense.logits(IDS)) < 1e-5


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_auto_uses_the_crossover_measured_for_the_files_types(tmp_path, monkeypatch, fmt):
    """Without ST_C_SPARSE_LIVE the threshold is the kernel variant's and type family's measured
    crossover on this CPU's maker's cores (lower for the k-quants on AMD's, whose up keeps the file's
    layout)."""
    import st_sdk
    from st_sdk_backends.c.layouts import crossover

    b = _with_sparse_layouts()
    monkeypatch.delenv("ST_C_SPARSE_LAYOUT", raising=False)
    monkeypatch.delenv("ST_C_SPARSE_LIVE", raising=False)
    path = _trained_tiny(tmp_path, fmt)
    m = st_sdk.load(path, backend="c")
    threshold = crossover(b.variant, fmt)
    assert m.backend.live_thresholds == [threshold] * 8
    assert m.backend.layer_layouts == ["up+down" if s < threshold else "off" for s in m.backend.load_live_shares]
    for lp, layout in zip(m.params.layers, m.backend.layer_layouts):
        assert lp.down.value.layout == ("neuron_major" if layout == "up+down" else "repacked")


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", "SomeOtherMaker"])
def test_auto_takes_the_crossover_of_the_cpus_maker(tmp_path, monkeypatch, vendor):
    """The repacked layout's streams and the sparse layouts' scattered reads trade differently on each
    maker's cores: where one has its own measured crossover, a load on its CPU uses it, else the kernel
    variant's."""
    import dataclasses

    import st_sdk
    from st_sdk.hardware import probe
    from st_sdk_backends.c import layouts

    b = _with_sparse_layouts()
    monkeypatch.delenv("ST_C_SPARSE_LAYOUT", raising=False)
    monkeypatch.delenv("ST_C_SPARSE_LIVE", raising=False)
    monkeypatch.setattr(layouts, "probe", lambda: dataclasses.replace(probe(), vendor=vendor))
    want = layouts.VENDOR_LIVE_THRESHOLD.get((vendor, b.variant, "legacy"),
                                             layouts.LIVE_THRESHOLD.get((b.variant, "legacy"), 0.22))
    m = st_sdk.load(_trained_tiny(tmp_path), backend="c")
    assert m.backend.live_thresholds == [want] * 8
    assert m.backend.layer_layouts == ["up+down" if s < want else "off" for s in m.backend.load_live_shares]


def test_measuring_live_shares_at_load_leaves_the_counters_as_they_were(tmp_path, monkeypatch):
    import st_sdk

    b = _with_sparse_layouts()
    path = _trained_tiny(tmp_path)
    monkeypatch.setenv("ST_C_SPARSE_LAYOUT", "auto")
    m = st_sdk.load(path, backend="c")
    m.logits(IDS[:4])
    before, clocks = b.sparsity(), b.stage_seconds()
    assert before["tokens"] >= 4
    again = st_sdk.load(path, backend="c")
    assert again.backend.layer_layouts is not None   # the live shares were measured
    assert b.sparsity() == before and b.stage_seconds() == clocks


def test_a_quantised_trained_routing_file_has_the_stated_live_shares(tmp_path):
    """`st-sdk synth --routing trained` states each layer's share of live ReGLU neurons; a quantised file
    run with Q8 activations must have them too. Its designed coordinates are small, and where they
    shared an activation block with the rest of the stream, grown over the layers, they were rounded
    to noise (here up to 0.03 more live; the 4b-a0.6b's Q4_0 file had 38-50% for 12-26%)."""
    import st_sdk
    from st_sdk.data import routing_stats_path
    from st_sdk.routing import RoutingStats
    from st_sdk.synth import write_model
    from st_sdk_backends.c.layouts import live_shares

    _available()
    layers = 12
    path = write_model(tmp_path, preset="tiny", layers=layers, formats=("gguf",), dtype="q4_0", seed=0,
                       routing="trained", hidden_size=1024, moe_ffn_hidden_size=128, head_dim=128,
                       num_attention_heads=8, moe_num_primary_experts=16, moe_num_active_primary_experts=4)["gguf"]
    stated = [1 - layer.relu_zero_fraction for layer in RoutingStats.load(routing_stats_path()).layers]
    m = st_sdk.load(path, backend="c")
    got = live_shares(m.backend, m.params, m.config, tokens=256)
    for i, share in enumerate(got):
        assert abs(share - stated[i * len(stated) // layers]) < 0.015, (i, got)


def test_a_bad_live_threshold_is_refused(monkeypatch):
    from st_sdk.errors import BackendError

    _available()
    monkeypatch.setenv("ST_C_SPARSE_LAYOUT", "auto")
    for bad in ("1.5", "half"):
        monkeypatch.setenv("ST_C_SPARSE_LIVE", bad)
        with pytest.raises(BackendError, match=f"ST_C_SPARSE_LIVE='{bad}'"):
            CBackend().setup()


@pytest.mark.parametrize("threads", [1, 2])
def test_read_chunks_probe_reads_the_chunks_it_is_given(threads):
    """benchmarks/sparse_reglu.py --probe's reader: the chunks picked (or every chunk, as a stream) read
    whole whatever the thread count, their 64-bit words summed; bad arguments refused."""
    ffi, lib = cops.ffi_lib()
    pool = cbackend.get_pool(threads)
    rng = np.random.default_rng(0)
    chunk, n = 864, 1000
    buf = rng.integers(0, 2**63, n * chunk // 8, dtype=np.uint64)
    base, out = ffi.cast("const uint8_t *", buf.ctypes.data), ffi.new("uint64_t *")
    words = buf.reshape(n, chunk // 8)
    with np.errstate(over="ignore"):
        whole = int(words.sum(dtype=np.uint64))
        picks = np.flatnonzero(rng.random(n) < 0.35).astype(np.int32)
        some = int(words[picks].sum(dtype=np.uint64))
    assert lib.st_read_chunks(pool, base, chunk, ffi.NULL, n, 8, out) == 0 and out[0] == whole
    idx = ffi.cast("const int32_t *", picks.ctypes.data)
    assert lib.st_read_chunks(pool, base, chunk, idx, len(picks), 8, out) == 0 and out[0] == some
    assert lib.st_read_chunks(pool, base, chunk, idx, len(picks), 0, out) == 0 and out[0] == some
    assert lib.st_read_chunks(pool, base, 100, ffi.NULL, 10, 8, out) != 0      # not whole words
    assert lib.st_read_chunks(pool, base, chunk, ffi.NULL, -1, 8, out) != 0
    assert lib.st_read_chunks(pool, ffi.NULL, chunk, ffi.NULL, 1, 8, out) != 0
