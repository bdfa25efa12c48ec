"""The PyTorch backend against the NumPy reference: every op (through the conformance kit), whole-model
logits in float32 and bfloat16, incremental decode past the sliding window, load-time conversion of
every stored format, the preallocated KV cache, and host reads per decode step."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from st_sdk import synth  # noqa: E402
from st_sdk.backend import Param  # noqa: E402
from st_sdk.errors import BackendError  # noqa: E402
from st_sdk.testing import ConformanceSuite  # noqa: E402
from st_sdk.weights.tensor import WeightTensor, quantize  # noqa: E402
from st_sdk_backends.torch.backend import TorchBackend  # noqa: E402

#: bfloat16 whole-model bound used below (the kit's table says 8e-2; we hold ourselves to less)
BF16_MODEL_TOL = 5e-2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from a second thread, and a shared CI machine makes thread barriers
    slow; torch's thread count is process-wide, so put it back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TestTorchConformance(ConformanceSuite):
    backend = TorchBackend
    formats = ("f32", "q8_0", "q4_k", "q5_0")   # every format is also checked at load below
    dtypes = ("float32", "bfloat16")


def torch_model(cfg="tiny", dtype="float32", fmt="f32", seed=0, **kw):
    return synth.build_model(cfg, seed=seed, fmt=fmt, backend=TorchBackend(dtype=dtype, **kw))


def rel_err(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def ids64():
    return np.random.default_rng(7).integers(0, synth.preset_config("tiny").vocab_size, 64)


@pytest.fixture(scope="module")
def reference_logits(ids64):
    return synth.build_model("tiny", backend="numpy").logits(ids64)


def test_plugin_import_does_not_import_torch():
    code = ("import sys; from st_sdk.registry import get_registry; b = get_registry().backends(); "
            "assert 'torch' in b, b; assert 'torch' not in sys.modules, 'torch imported at discovery'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_float32_logits_match_reference(ids64, reference_logits):
    got = torch_model(dtype="float32").logits(ids64)
    assert got.dtype == np.float32 and got.shape == reference_logits.shape
    assert rel_err(got, reference_logits) <= 1e-4


def test_bfloat16_logits_within_tolerance_and_top1(ids64, reference_logits):
    f32 = torch_model(dtype="float32").logits(ids64)
    bf16 = torch_model(dtype="bfloat16").logits(ids64)
    assert rel_err(bf16, reference_logits) <= BF16_MODEL_TOL
    # teacher-forced: the same 64 input tokens, top-1 of each position
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_incremental_decode_equals_full_forward_past_the_window(dtype, ids64):
    m = torch_model(dtype=dtype)
    full = m.logits(ids64[:40])            # tiny: window 8, so 40 tokens wrap every ring 5 times
    s = m.session(capacity=16)             # global layers outgrow 16 slots and must grow
    parts = [s.feed(ids64[:11], all_logits=True, chunk=3)]
    parts += [s.feed([t], all_logits=True) for t in ids64[11:30]]
    parts.append(s.feed(ids64[30:40], all_logits=True, chunk=20))
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert rel_err(np.concatenate(parts), full) <= tol


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_every_stored_format_is_converted_at_load(fmt):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 64, 96)).astype(np.float32)
    stacked = WeightTensor("gate", fmt, x.shape, quantize(fmt, x))
    parts = WeightTensor.stack("gate", [WeightTensor(f"gate{e}", fmt, x.shape[1:], quantize(fmt, x[e]))
                                        for e in range(3)])
    b = TorchBackend(dtype="float32")
    assert b.is_available()
    want = stacked.numpy()
    for t in (stacked, parts):
        got = b.prepare(Param(t), "gate")
        assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
        np.testing.assert_array_equal(got.numpy(), want)    # dequantised exactly, once
    b16 = TorchBackend(dtype="bfloat16")
    assert b16.is_available()
    assert b16.prepare(Param(stacked), "up").dtype == torch.bfloat16
    router = WeightTensor("router", "f32", (4, 96), np.ascontiguousarray(x[0, :4]))
    assert b16.prepare(Param(router), "router").dtype == torch.float32   # the router stays full precision


def test_quantised_model_matches_reference_on_same_weights():
    ids = np.arange(20) * 7 % 512
    want = synth.build_model("tiny", fmt="q4_0", backend="numpy").logits(ids)
    got = torch_model(fmt="q4_0").logits(ids)
    assert rel_err(got, want) <= 1e-4


def test_gguf_file_loads_through_st_sdk_load(tmp_path):
    import st_sdk

    out = synth.write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0")
    ids = np.arange(12) * 11 % 512
    want = st_sdk.load(out["gguf"], backend="numpy").logits(ids)
    m = st_sdk.load(out["gguf"], backend="torch", dtype="float32")
    assert m.selection.chosen == "torch"
    d = m.backend.describe()
    assert d["compute_dtype"] == "float32" and "dequantised at load" in d["weights"]
    assert rel_err(m.logits(ids), want) <= 1e-4


def test_dtype_is_validated_and_defaults_are_stated():
    with pytest.raises(BackendError, match="dtype"):
        TorchBackend(dtype="float16")
    assert TorchBackend(dtype="bf16").dtype == "bfloat16"
    b = TorchBackend()
    assert b.is_available()
    assert b.describe()["compute_dtype"] in ("float32", "bfloat16")
    assert b.describe()["device"].startswith(("cpu", "cuda"))


def test_kv_cache_is_preallocated_and_ring_buffered():
    m = torch_model()
    cfg = m.config
    cache = m.ops.new_cache(cfg, 32)
    for i, layer in enumerate(cache.layers):
        slots = cfg.layer_window(i) or 32
        assert tuple(layer.k.shape) == (cfg.num_key_value_heads, slots, cfg.head_dim)
        assert layer.k.device == m.backend.device
    s = m.session(capacity=32)
    s.feed(np.arange(20))
    ring = next(layer for i, layer in enumerate(s.cache.layers) if cfg.layer_window(i))
    w = ring.window
    # slot = position % window: the ring holds exactly the last `window` positions
    assert sorted(ring.pos.tolist()) == list(range(20 - w, 20))
    assert ring.pos[19 % w].item() == 19


def test_moe_gather_equals_in_place_slices():
    ids = np.arange(30) * 5 % 512
    loop = torch_model(moe_decode="loop").session()
    gather = torch_model(moe_decode="gather").session()
    loop.feed(ids[:10])
    gather.feed(ids[:10])
    for t in ids[10:]:
        np.testing.assert_allclose(gather.feed([t]), loop.feed([t]), rtol=0, atol=1e-5)


class HostReads:
    """Counts every way a torch tensor's values reach Python during a block."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.count = 0
        self.saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, self._counting(fn))
        return self

    def _counting(self, fn):
        def wrapper(t, *a, **k):
            self.count += 1
            return fn(t, *a, **k)
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("strategy", ["gather", "loop"])
def test_host_reads_per_decode_step(strategy):
    m = torch_model(moe_decode=strategy)
    s = m.session()
    s.feed(np.arange(12))
    cache = s.cache
    with HostReads() as reads:
        logits = m._forward(np.array([5]), np.array([12]), cache, last_only=True)
    assert isinstance(logits, torch.Tensor)
    # gather: nothing leaves the device inside the step; loop (CPU weights): the k picked ids of each
    # layer are read from host memory, one tolist() per layer
    assert reads.count == (0 if strategy == "gather" else m.config.num_hidden_layers)


def test_bf16_file_is_used_in_place_without_a_copy(tmp_path):
    import st_sdk

    out = synth.write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="bf16")
    ids = np.arange(20) * 3 % 512
    want = st_sdk.load(out["gguf"], backend="numpy").logits(ids)
    m = st_sdk.load(out["gguf"], backend="torch", dtype="bfloat16")
    for p in (m.params.layers[0].gate, m.params.layers[0].down, m.params.embed):
        assert p.value.data_ptr() == p.raw.data.ctypes.data     # the file's pages, not a copy
    assert rel_err(m.logits(ids), want) <= BF16_MODEL_TOL
    s = m.session()                                             # one-token steps on the mapped gate/up
    s.feed(ids[:12])
    steps = np.stack([s.feed([t]) for t in ids[12:]])
    assert rel_err(steps, want[12:]) <= BF16_MODEL_TOL


def test_one_token_steps_at_gapped_and_rewound_positions_match_reference():
    """A one-token step skips the attention mask only while positions ran 0, 1, 2, ...; after a gap
    (stale ring slots) or a rewind (keys after the query) it must mask them as the reference does."""
    ref, m = synth.build_model("tiny", backend="numpy"), torch_model()
    caches = [model.session().cache for model in (ref, m)]
    steps = [(np.arange(6), np.arange(6)), ([7], [6]), ([9], [12]), ([4], [13]), ([2], [5]), ([8], [14])]
    for ids, pos in steps:                                      # tiny: window 8, so 6 -> 12 leaves stale slots
        want, got = (model._forward(np.asarray(ids), np.asarray(pos), c, last_only=True)
                     for model, c in zip((ref, m), caches))
        assert rel_err(m.ops.to_numpy(got), ref.ops.to_numpy(want)) <= 1e-5, pos


def test_thread_and_page_settings_default_only_when_unset():
    code = ("import os; from st_sdk_backends.torch.backend import TorchBackend; TorchBackend().setup(); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE")}
    run = lambda **extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, text=True,  # noqa: E731
                                         capture_output=True, check=True).stdout.split()
    assert run() == ["1000", "1"]
    assert run(OMP_WAIT_POLICY="PASSIVE", THP_MEM_ALLOC_ENABLE="0") == ["None", "0"]


def test_memory_budget_mode_matches_reference(tmp_path):
    """Under max_memory the experts stay in the file and the step runs op by op; the fused-step
    preparation must leave those experts alone."""
    import st_sdk

    out = synth.write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0")
    ids = np.arange(20) * 7 % 500
    want = st_sdk.load(out["gguf"], backend="numpy").logits(ids)
    m = st_sdk.load(out["gguf"], backend="torch", dtype="float32", max_memory="4GiB")
    assert m.offload is not None
    assert rel_err(m.logits(ids), want) <= 1e-5
    s = m.session()
    s.feed(ids[:10])
    assert rel_err(np.stack([s.feed([t]) for t in ids[10:]]), want[10:]) <= 1e-5
