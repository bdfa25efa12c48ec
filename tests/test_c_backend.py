"""The C kernel backend (backends/c, csrc/): conformance with the NumPy reference for every op and
format, every instruction-set variant against the generic one, thread counts, sparse vs dense experts,
GGUF weights used in place, and bad input raising Python errors instead of crashing.

Tolerances: float formats (f32/f16/bf16) match the reference within 1e-4 x max|value| (the kit's
table). Q8_0/Q4_0 quantise activations to 8-bit blocks for integer dot products, as llama.cpp does:
ops within 2e-2 and whole-model logits within 5e-2 x max|logit| of the reference on the same
quantised weights (st_sdk.testing.tolerances).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import c_variants, rel_err
from st_sdk.backend import Param
from st_sdk.errors import InputError
from st_sdk.testing import ConformanceSuite
from st_sdk.weights.tensor import WeightTensor, quantize

from st_sdk_backends.c import backend as cbackend
from st_sdk_backends.c import ops as cops
from st_sdk_backends.c.backend import CBackend

FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0")
IDS = np.array([3, 17, 256, 99, 400, 12, 7, 311, 64, 128, 5, 460, 33, 2], np.int64)   # longer than tiny's window (8)


def _available() -> CBackend:
    b = CBackend()
    if not b.is_available():
        pytest.skip(f"C backend unavailable: {b.unavailable_reason()}")
    return b


# tests that force a kernel variant put automatic selection back afterwards
pytestmark = pytest.mark.usefixtures("automatic_c_variant")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _weight(fmt: str, shape, seed: int = 0, scale: float = 0.02) -> Param:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return Param(WeightTensor(f"w{list(shape)}", fmt, tuple(shape), quantize(fmt, x)))


def _tiny(fmt: str, backend="c", **kw):
    from st_sdk.synth import build_model

    return build_model("tiny", seed=0, fmt=fmt, backend=backend, **kw)


class TestCConformance(ConformanceSuite):
    """Every op and whole-model logits against the reference, for each stored format."""

    backend = CBackend
    formats = FORMATS


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_variant_matches_generic(fmt):
    """The AVX2/AVX-512 kernels compute what the portable C does (up to float summation order)."""
    _available()
    others = [v for v in c_variants() if v != "generic"]
    if not others:
        pytest.skip("this CPU runs only the generic variant")
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    w = _weight(fmt, (40, 96))
    results = {}
    for v in ["generic"] + others:
        cbackend.use_variant(v)
        m = _tiny(fmt, kv_dtype="f32")   # attention's variants on f16 / q8_0 caches: test_c_attention.py
        assert m.backend.describe()["variant"] == v
        s = m.session()
        prefill = s.feed(IDS[:10], all_logits=True)
        decode = np.stack([s.feed([t]) for t in IDS[10:]])
        results[v] = (CBackend().linear(x, w), prefill, decode)
    for v in others:
        for got, want in zip(results[v], results["generic"]):
            assert _rel(got, want) < 1e-5, f"{v} differs from generic on {fmt}"


def test_thread_counts_agree():
    """Rows are split across threads, never reduced across them: 1 and 2 threads agree exactly."""
    _available()
    one = _tiny("q4_0", n_threads=1)
    two = _tiny("q4_0", n_threads=2)
    assert one.backend.threads == 1
    np.testing.assert_array_equal(one.logits(IDS), two.logits(IDS))


def test_stage_seconds_add_up_to_the_fused_passes():
    """Backend.stage_seconds: every stage of a layer and the head timed, adding up to no more than the
    passes took, attention's the same clock as st_attention_seconds; reset starts them from zero."""
    import time

    from st_sdk_backends.c.ops import ffi_lib

    _available()
    m = _tiny("q4_0", n_threads=2)
    s = m.session()
    s.feed(IDS[:6].tolist())
    m.backend.stage_seconds(reset=True)
    assert set(m.backend.stage_seconds().values()) == {0.0}
    t0 = time.perf_counter()
    for t in IDS[6:]:
        s.feed([int(t)])
    wall = time.perf_counter() - t0
    st = m.backend.stage_seconds()
    assert list(st) == ["embed", "attn_norm", "qkv_router", "rope_route", "attention", "attn_out", "ffn_norm",
                        "gate_up", "down", "head"]
    assert all(v > 0 for v in st.values()), st
    assert sum(st.values()) <= wall
    assert st["attention"] == ffi_lib()[1].st_attention_seconds()


def test_wait_seconds_count_threads_waiting_for_one_another():
    """Backend.wait_seconds: the time the pool's threads waited for one another, summed over them: some
    on two threads (one thread of a pair reaches each barrier first), never more than the threads'
    time in the calls; reset with the stage clocks; the live-neuron measuring of a load leaves it as it
    was."""
    import time

    _available()
    m = _tiny("q4_0", n_threads=2)
    assert m.backend.threads == 2
    s = m.session()
    s.feed(IDS[:6].tolist())
    m.backend.stage_seconds(reset=True)
    assert m.backend.wait_seconds() == 0.0
    t0 = time.perf_counter()
    for t in IDS[6:]:
        s.feed([int(t)])
    wall = time.perf_counter() - t0
    waited = m.backend.wait_seconds()
    assert 0 < waited <= 2 * wall
    from st_sdk_backends.c.layouts import live_shares

    assert len(live_shares(m.backend, m.params, m.config)) == m.config.num_hidden_layers   # a load's measuring
    assert m.backend.wait_seconds() == pytest.approx(waited, abs=1e-9)


@pytest.mark.parametrize("fmt", ["f32", "q4_0"])
def test_sparse_and_dense_experts_agree(fmt):
    """Skipping up rows of neurons with relu(gate) == 0 changes nothing: those neurons contribute 0."""
    b = _available()
    H, F, E, T, k = 64, 96, 4, 5, 2
    rng = np.random.default_rng(3)
    gate, up = (Param(WeightTensor(n, fmt, (E, F, H), quantize(fmt, 0.1 * rng.standard_normal((E, F, H), np.float32))))
                for n in ("gate", "up"))
    down = Param(WeightTensor("down", fmt, (E, H, F), quantize(fmt, 0.1 * rng.standard_normal((E, H, F), np.float32))))
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, k)).astype(np.float32)
    sparse = b.moe(x, gate, up, down, ids, w, sparse=True)
    dense = b.moe(x, gate, up, down, ids, w, sparse=False)
    np.testing.assert_array_equal(sparse, dense)
    from st_sdk_backends.numpy import ops as ref
    assert _rel(sparse, ref.moe(x, gate, up, down, ids, w)) < (1e-5 if fmt == "f32" else 2e-2)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_gguf_weights_used_in_place(tmp_path, monkeypatch, fmt):
    """A quantised GGUF runs from its memory map. With ST_C_REPACK=0 no weight is copied at all; by
    default the SIMD kernels read an 8-row repacked copy of the matrices, which is reported, while the
    embedding stays in the map. Both match the reference run on the same file."""
    _available()
    import st_sdk
    from st_sdk.synth import write_model

    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype=fmt, seed=0)["gguf"]
    ref = st_sdk.load(path, backend="numpy").logits(IDS)
    monkeypatch.setenv("ST_C_REPACK", "0")
    c = st_sdk.load(path, backend="c")
    d = c.backend.describe()
    assert d["copied_weight_bytes"] == 0 and d["repacked_weight_bytes"] == 0
    wq = c.params.layers[0].wq
    assert np.shares_memory(wq.value.data, wq.raw.data)
    assert isinstance(wq.raw.data, np.memmap) or isinstance(wq.raw.data.base, np.memmap)
    in_place = c.logits(IDS)
    assert _rel(in_place, ref) < 5e-2
    monkeypatch.delenv("ST_C_REPACK")
    c = st_sdk.load(path, backend="c")
    if c.backend.describe()["variant"] in ("avx2", "avx512"):
        assert c.backend.describe()["repacked_weight_bytes"] > 0
        # the repacked tensors' pages are dropped from the map (they refault unchanged if read again)
        assert c.backend.describe()["released_map_bytes"] > 0
        assert np.shares_memory(c.params.embed.value.data, c.params.embed.raw.data)
    # same integer dot products, only the float summation order differs
    assert _rel(c.logits(IDS), in_place) < 1e-5


def test_auto_selection_prefers_c_for_quantised_weights():
    _available()
    if not (cbackend.cpu_flags() & {"avx2", "avx512f", "neon"}):
        pytest.skip("no SIMD the C backend ranks itself high for")
    m = _tiny("q4_0", backend="auto")
    assert m.selection.chosen == "c"
    chosen = next(c for c in m.selection.candidates if c.name == "c")
    assert chosen.details["variant"] in c_variants()


def test_st_c_variant_forces_and_reports(monkeypatch):
    _available()
    monkeypatch.setenv("ST_C_VARIANT", "generic")
    b = CBackend()
    assert b.is_available() and b.describe()["variant"] == "generic"
    monkeypatch.setenv("ST_C_VARIANT", "sse9")
    b = CBackend()
    assert not b.is_available()
    assert "ST_C_VARIANT" in b.unavailable_reason()


def test_st_num_threads(monkeypatch):
    _available()
    monkeypatch.setenv("ST_NUM_THREADS", "1")
    assert CBackend().threads == 1
    assert CBackend(n_threads=1).describe()["threads"] == 1
    with pytest.raises(InputError):
        CBackend(n_threads=0)


def test_missing_compiled_module_reports_unavailable(monkeypatch):
    """Without the compiled module (no compiler at install) the backend says so instead of failing."""
    monkeypatch.setattr(cops, "_loaded", None)
    monkeypatch.setattr(cops, "_load_error", None)
    monkeypatch.setenv("ST_C_KERNELS_PATH", "/nonexistent/_st_kernels.so")
    b = CBackend()
    assert not b.is_available()
    assert "_st_kernels" in b.unavailable_reason()


def test_bad_input_raises_python_errors():
    b = _available()
    w = _weight("q4_0", (32, 64))
    with pytest.raises(InputError, match="linear x"):
        b.linear(np.zeros((2, 63), np.float32), w)
    with pytest.raises(InputError):
        b.linear(np.zeros((2, 64), np.int32), w)
    with pytest.raises(InputError, match="ids"):
        b.embed(w, [0, 32])
    with pytest.raises(InputError, match="2-D"):
        b.linear(np.zeros((1, 64), np.float32), _weight("f32", (2, 32, 64)))
    with pytest.raises(InputError, match="k="):
        b.route(np.zeros((1, 64), np.float32), w, 33, False)
    gate = _weight("f32", (4, 32, 64))
    down = _weight("f32", (4, 64, 32))
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(InputError, match="moe ids"):
        b.moe(x, gate, gate, down, np.array([[0, 4]]), np.ones((1, 2), np.float32))
    with pytest.raises(InputError, match="expert shapes"):
        b.moe(x, gate, gate, gate, np.array([[0, 1]]), np.ones((1, 2), np.float32))
    # storage that does not match its declared shape never reaches C
    bad = WeightTensor("w", "q4_0", (32, 64), quantize("q4_0", np.zeros((32, 64), np.float32)))
    bad.data = bad.data[:, :20]
    with pytest.raises(InputError, match="does not match"):
        b.linear(x, Param(bad))


def test_bad_cache_and_positions():
    _available()
    m = _tiny("f32")
    b, cfg = m.backend, m.config
    cache = b.new_cache(cfg, 4)
    q = np.zeros((2, cfg.num_attention_heads, cfg.head_dim), np.float32)
    kv = np.zeros((2, cfg.num_key_value_heads, cfg.head_dim), np.float32)
    with pytest.raises(InputError, match="window"):
        b.attention(q, kv, kv, cache.layers[0], b.context(cfg, np.arange(2)), 5)
    with pytest.raises(InputError, match="positions"):
        b.attention(q, kv, kv, cache.layers[0], b.context(cfg, np.array([0, -1])), None)
    with pytest.raises(InputError, match="own new_cache"):
        b.attention(q, kv, kv, object(), b.context(cfg, np.arange(2)), None)
    with pytest.raises(InputError):
        b.forward(cfg, m.params, np.array([0, cfg.vocab_size]), np.arange(2), cache)
    other = cfg.replace(num_key_value_heads=1, num_attention_heads=2)
    with pytest.raises(InputError, match="different model shape"):
        b.forward(cfg, m.params, IDS[:2], np.arange(2), b.new_cache(other, 4))
    # a global layer's cache grows past its initial capacity
    logits = b.forward(cfg, m.params, IDS, np.arange(len(IDS)), cache)
    assert logits.shape == (len(IDS), cfg.vocab_size) and cache.layers[0].length == len(IDS)


def test_kernels_validate_in_c_too():
    """Entry points called with null pointers or inconsistent sizes return an error code, not a crash."""
    _available()
    ffi, lib = cops.ffi_lib()
    assert lib.st_linear(ffi.NULL, ffi.NULL, ffi.NULL, 1, ffi.NULL) == -1
    m = ffi.new("st_mat *", {"data": ffi.NULL, "rows": 4, "cols": 33, "row_bytes": 18, "fmt": 4})
    y = ffi.new("float[4]")
    x = ffi.new("float[33]")
    assert lib.st_linear(ffi.NULL, m, x, 1, y) == -1
    assert lib.st_forward(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 1, 1, y) == -1
    assert lib.st_set_variant(99) != 0


def test_shared_model_across_python_threads():
    """One model, sessions in several Python threads at once: results equal the serial ones."""
    _available()
    import threading

    m = _tiny("q4_0", n_threads=2)
    prompts = [IDS[i:i + 6] for i in range(4)]
    serial = [m.logits(p) for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = m.logits(prompts[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(got, serial):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:os.fork")   # other plugins' threads: the child touches only C
def test_forked_child_gets_its_own_thread_pool():
    """A child forked after the pool started (multiprocessing's default on Linux) still computes."""
    _available()
    import os

    m = _tiny("q4_0", n_threads=2)
    want = m.logits(IDS[:5])
    pid = os.fork()
    if pid == 0:   # child: never return into pytest
        try:
            os._exit(0 if np.array_equal(m.logits(IDS[:5]), want) else 3)
        except BaseException:
            os._exit(4)
    import time

    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("forked child hung (thread pool inherited without its threads?)")
    assert done[1] == 0


@pytest.mark.parametrize("quantize", [None, "q4_0"])
def test_hf_checkpoint_runs_and_quantises_at_load(tmp_path, quantize):
    """HF bf16 weights run as stored (per-expert tensors, no copy); quantize= converts them at load."""
    _available()
    import st_sdk
    from st_sdk.synth import write_model

    hf = write_model(tmp_path, preset="tiny", formats=("hf",), dtype="bf16", seed=0)["hf"]
    c = st_sdk.load(hf, backend="c", quantize=quantize, kv_dtype="f32")
    ref = st_sdk.load(hf, backend="numpy", quantize=quantize)
    assert c.params.layers[0].gate.raw.parts is not None
    assert c.backend.describe()["copied_weight_bytes"] == 0
    assert _rel(c.logits(IDS), ref.logits(IDS)) < (1e-4 if quantize is None else 5e-2)


@pytest.mark.parametrize("fmt", ["f32", "q4_0"])
def test_whole_block_heads_path(fmt):
    """head_dim a multiple of 32 (as in the real models) takes the path that quantises each head's
    attention output where it is computed; it agrees with the reference too."""
    _available()
    from st_sdk.loader import build_model
    from st_sdk.synth import preset_config, random_params

    cfg = preset_config("tiny", head_dim=32, hidden_size=96)
    params = random_params(cfg, 0, fmt)
    c = build_model(cfg, params, backend="c", weight_format=fmt, kv_dtype="f32")
    ref = build_model(cfg, params, backend="numpy", weight_format=fmt)
    s = c.session()
    got = np.concatenate([s.feed(IDS[:9], all_logits=True), np.stack([s.feed([t]) for t in IDS[9:]])])
    assert _rel(got, ref.logits(IDS)) < (1e-4 if fmt == "f32" else 5e-2)


@pytest.mark.parametrize("budget", [False, True])
def test_a_gate_and_up_of_different_types_run(tmp_path, budget):
    """A file may store a layer's expert gate and up in different types: here the gate in IQ4_NL beside
    an up in Q4_0 (the same bytes a block, so the file stays valid). The kernel reads a repacked up only
    beside a repacked gate, so that up keeps the file's layout, resident and under a memory budget: the
    model runs, with the reference's logits (it failed with an unnamed invalid-argument error)."""
    import struct

    import st_sdk
    from fuzzing import _patch, gguf_layout
    from st_sdk.synth import write_model

    path = write_model(tmp_path / "base", formats="gguf", dtype="q4_0")["gguf"]
    data = path.read_bytes()
    gate = next(t for t in gguf_layout(data).tensors if t.name == "blk.2.ffn_gate_exps.weight")
    mixed = tmp_path / "mixed.gguf"
    mixed.write_bytes(_patch(data, gate.type_off, struct.pack("<I", 20)))   # GGML_TYPE_IQ4_NL
    kw = dict(max_memory="64GiB", context=64) if budget else {}
    m = st_sdk.load(mixed, backend="c", n_threads=2, **kw)
    layers = m.params.layers
    if budget:
        assert layers[2].gate.raw.fmt == "iq4_nl" and layers[2].up.raw.layout is None
    else:
        assert (layers[2].gate.value.layout, layers[2].up.value.layout) == ("file", "file")
        if m.backend._repacking():
            assert layers[1].up.value.layout in ("repacked", "row_split")   # the other layers as before
    ids = [1, 5, 9, 13, 17, 21]
    got, want = m.logits(ids), st_sdk.load(mixed, backend="numpy").logits(ids)
    base = rel_err(st_sdk.load(path, backend="c").logits(ids), st_sdk.load(path, backend="numpy").logits(ids))
    assert rel_err(got, want) < 2 * base   # the C backend's activations in Q8, as on the file before
