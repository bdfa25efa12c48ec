"""KV cache: incremental decode and chunked prefill give the full-sequence logits, well past the sliding
window, on every registered backend; sliding-window layers keep a bounded ring, global layers grow."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import params_from_hf, random_hf_weights, reference_logits
from st_sdk.config import ModelConfig
from st_sdk.loader import build_model
from st_sdk.registry import get_registry
from st_sdk.testing import tolerance
from st_sdk.testing.tolerances import compute_dtype

WINDOW = 3
T = 4 * WINDOW          # well past the window
REL_TOL = 1e-4          # float32 cache paths vs one float32 full pass, in units of max|logit|

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, moe_num_primary_experts=4,
                  moe_num_active_primary_experts=2, moe_ffn_hidden_size=32,
                  rope_layout=(0, 1, 1, 1), sliding_window_layout=(0, 1, 1, 1), sliding_window_size=WINDOW,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=256, source="<kv>")
WEIGHTS = random_hf_weights(CFG, seed=7)
IDS = np.random.default_rng(8).integers(0, CFG.vocab_size, T)


def _backend_names():
    return sorted(get_registry().backends())


_models: dict[str, tuple] = {}


def _model(name: str):
    """(model, its own full-sequence logits of IDS, tolerance) on backend `name`, float32 compute
    when the backend offers it; the tolerance is the kit's for the compute dtype it reports."""
    if name not in _models:
        b = get_registry().backends()[name]()
        if not b.is_available():
            pytest.skip(f"backend {name!r} unavailable: {b.unavailable_reason() or 'no reason given'}")
        model = build_model(CFG, params_from_hf(CFG, WEIGHTS), backend=name, dtype="float32")
        tol = max(REL_TOL, tolerance("f32", compute_dtype(model.backend), "model"))
        _models[name] = (model, model.logits(IDS), tol)
    return _models[name]


@pytest.fixture(scope="module")
def full():
    """The NumPy model's full-sequence logits, checked against the float64 reference."""
    ref = reference_logits(CFG, WEIGHTS, IDS)
    got = _model("numpy")[1]
    assert np.max(np.abs(got - ref)) <= REL_TOL * np.max(np.abs(ref))
    return got


def _close(got, want, tol=REL_TOL) -> bool:
    return bool(np.max(np.abs(got - want)) <= tol * np.max(np.abs(want)))


@pytest.mark.parametrize("backend", _backend_names())
def test_decode_token_by_token_equals_full_forward(backend):
    model, full, tol = _model(backend)
    s = model.session()
    steps = np.stack([s.feed([int(t)]) for t in IDS])
    assert steps.shape == (T, CFG.vocab_size)
    assert _close(steps, full, tol)
    assert s.tokens == [int(t) for t in IDS]


def _chunk_cases():
    """Chunks smaller and larger than the window on every backend; the edge sizes on NumPy only, to
    keep compiled backends (one compilation per new shape) fast."""
    out = []
    for name in _backend_names():
        sizes = [1, WINDOW - 1, WINDOW, WINDOW + 3, T + 5] if name == "numpy" else [WINDOW - 1, WINDOW + 3]
        out += [pytest.param(name, c, id=f"{name}-{c}") for c in sizes]
    return out


@pytest.mark.parametrize("backend,chunk", _chunk_cases())
def test_chunked_prefill_equals_full_forward(backend, chunk):
    model, full, tol = _model(backend)
    assert _close(model.session().feed(IDS, all_logits=True, chunk=chunk), full, tol)


@pytest.mark.parametrize("backend", _backend_names())
def test_prefill_then_decode(backend):
    model, full, tol = _model(backend)
    s = model.session()
    last = s.feed(IDS[:7], chunk=2)                        # only the last position's logits
    assert last.shape == (CFG.vocab_size,) and _close(last, full[6], tol)
    rest = np.stack([s.feed([int(t)]) for t in IDS[7:]])
    assert _close(rest, full[7:], tol)


def _layer_bytes(cache) -> list[int]:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "nbytes") for layer in layers):
        pytest.skip("this backend's cache does not report per-layer nbytes")
    return [int(layer.nbytes) for layer in layers]


@pytest.mark.parametrize("backend", _backend_names())
def test_sliding_window_layers_stop_growing(backend):
    s = _model(backend)[0].session(capacity=2)    # start small so global layers must grow
    sizes = []
    for t in IDS:
        s.feed([int(t)])
        sizes.append(_layer_bytes(s.cache))
    sizes = np.array(sizes)                               # [T, layers]
    swa = [i for i in range(CFG.num_hidden_layers) if CFG.layer_window(i)]
    glob = [i for i in range(CFG.num_hidden_layers) if not CFG.layer_window(i)]
    per_token = 2 * CFG.num_key_value_heads * CFG.head_dim * 2   # k + v, at least 2 bytes each
    for i in swa:   # a ring: constant once the window is full, and about window-sized
        assert (sizes[WINDOW:, i] == sizes[WINDOW, i]).all(), f"layer {i}: {sizes[:, i]}"
        assert sizes[-1, i] < 2 * WINDOW * per_token * 4
    for i in glob:
        assert sizes[-1, i] >= T * per_token and sizes[-1, i] > sizes[WINDOW, i]


def test_numpy_ring_holds_exactly_the_last_window():
    s = _model("numpy")[0].session()
    s.feed(IDS, chunk=WINDOW + 3)
    for i, layer in enumerate(s.cache.layers):
        _, _, pos = layer.entries()
        want = range(T - WINDOW, T) if CFG.layer_window(i) else range(T)
        assert sorted(pos.tolist()) == list(want)


@settings(max_examples=12, deadline=None)
@given(cuts=st.lists(st.integers(1, T - 1), max_size=6, unique=True))
def test_any_chunk_split_gives_the_same_logits(full, cuts):
    s = _model("numpy")[0].session()
    bounds = [0, *sorted(cuts), T]
    got = np.concatenate([s.feed(IDS[a:b], all_logits=True) for a, b in zip(bounds, bounds[1:])])
    assert _close(got, full)


@pytest.mark.parametrize("backend", _backend_names())
def test_every_cache_checks_its_shape_and_window(backend):
    """Every backend's attention refuses a layer cache made for other heads or another window, with
    an InputError saying so, instead of writing past it or attending over the wrong keys."""
    from st_sdk.errors import InputError

    model = _model(backend)[0]
    ops, other = model.ops, CFG.replace(num_key_value_heads=1, num_attention_heads=2)
    q = ops.from_numpy(np.zeros((1, CFG.num_attention_heads, CFG.head_dim), np.float32))
    k = ops.from_numpy(np.zeros((1, CFG.num_key_value_heads, CFG.head_dim), np.float32))
    with ops.context(CFG, np.array([0])) as ctx:
        with pytest.raises(InputError, match="kv heads"):
            ops.attention(q, k, k, ops.new_cache(other, 4).layers[0], ctx, None)
        with pytest.raises(InputError, match="window"):
            ops.attention(q, k, k, ops.new_cache(CFG, 4).layers[1], ctx, None)


def test_the_policy_of_every_cache():
    from st_sdk import kv

    ring, glob = kv.layer_specs(CFG)[1], kv.layer_specs(CFG, "bfloat16")[0]
    assert (ring.window, glob.window, glob.dtype) == (WINDOW, None, "bfloat16")
    assert ring.initial_slots(100) == WINDOW and glob.initial_slots(100) == 100 and glob.initial_slots(0) == 1
    assert kv.grown_slots(8, 9) == 16 and kv.grown_slots(8, 40) == 40
    assert [kv.ring_slot(p, WINDOW) for p in range(5)] == [0, 1, 2, 0, 1]
    assert kv.ring_keep(2 * WINDOW + 1, WINDOW) == WINDOW + 1 and kv.ring_keep(2, WINDOW) == 0
