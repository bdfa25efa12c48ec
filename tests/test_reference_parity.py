"""Whole-model logits of every registered backend against the independent float64 reference.

The three configs together cover NoPE and RoPE layers, a sliding window shorter than the sequence
(also on a NoPE layer, so layouts are read independently), tied and untied heads, sigmoid and softmax
routers, GQA ratios 1, 2 and 3, q width != hidden, and top-k with k == 1, 1 < k < E and k == E.
Weights are scaled (reference.random_hf_weights) so attention, router and experts all move the
logits; test_configs_catch_each_mistake proves it.
"""
from __future__ import annotations

import numpy as np
import pytest

from reference import hf_weights_from_params, params_from_hf, random_hf_weights, reference_logits
from st_sdk.config import ModelConfig
from st_sdk.loader import build_model
from st_sdk.registry import get_registry
from st_sdk.testing import tolerance
from st_sdk.testing.tolerances import LOSSY, compute_dtype

#: f32 weights, float32 compute vs float64: max|diff| <= REL_TOL * max|logit|
REL_TOL = 1e-4


def _cfg(name, L, **kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=L, moe_ffn_hidden_size=32,
                rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512, source=f"<{name}>")
    return ModelConfig(**{**base, **kw})


CONFIGS = {
    # 21B-like: NoPE+global every 4th layer, RoPE+SWA (window 5 < 16 tokens) elsewhere; untied;
    # sigmoid router; GQA 3; q width 96 != hidden 64; k = 2 of 8
    "hybrid": (_cfg("hybrid", 4, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                    moe_num_primary_experts=8, moe_num_active_primary_experts=2,
                    rope_layout=(0, 1, 1, 1), sliding_window_layout=(0, 1, 1, 1), sliding_window_size=5,
                    tie_word_embeddings=False), 16),
    # 4B-like: RoPE + global everywhere; tied; softmax router; GQA 1; k == E
    "dense": (_cfg("dense", 2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                   moe_num_primary_experts=4, moe_num_active_primary_experts=4,
                   rope_layout=(1, 1), sliding_window_layout=(0, 0), tie_word_embeddings=True,
                   moe_primary_router_apply_softmax=True), 12),
    # layouts crossed: RoPE+global then NoPE+SWA (window 4 < 14); GQA 2; k == 1
    "crossed": (_cfg("crossed", 2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                     moe_num_primary_experts=4, moe_num_active_primary_experts=1,
                     rope_layout=(1, 0), sliding_window_layout=(0, 1), sliding_window_size=4,
                     tie_word_embeddings=False), 14),
}

#: which parity-checklist mistake each config must expose
CATCHES = {
    "hybrid": ["router_on_normed_input", "silu_experts", "interleaved_rope", "swa_off_by_one",
               "rope_on_nope_layers", "softmax_router", "swapped_head"],
    "dense": ["router_on_normed_input", "silu_experts", "interleaved_rope", "sigmoid_router"],
    "crossed": ["swa_off_by_one", "rope_on_nope_layers", "interleaved_rope", "swapped_head"],
}


def _backend_params():
    """Every registered backend, plus plugins that failed to load (skipped with their error)."""
    reg = get_registry()
    out = [pytest.param(name, id=name) for name in sorted(reg.backends())]
    for rec in reg.plugins:
        if rec.error and rec.name not in reg.backends():
            out.append(pytest.param(rec.name, id=rec.name,
                                    marks=pytest.mark.skip(reason=f"plugin {rec.name!r} did not load: {rec.error}")))
    return out


def _require(name: str):
    cls = get_registry().backends()[name]
    b = cls()
    if not b.is_available():
        pytest.skip(f"backend {name!r} unavailable: {b.unavailable_reason() or 'no reason given'}")
    return b


@pytest.fixture(scope="module")
def cases():
    """config name -> (cfg, f32 weights, ids, float64 reference logits)."""
    out = {}
    for i, (name, (cfg, T)) in enumerate(CONFIGS.items()):
        w = random_hf_weights(cfg, seed=10 + i)
        ids = np.random.default_rng(20 + i).integers(0, cfg.vocab_size, T)
        out[name] = (cfg, w, ids, reference_logits(cfg, w, ids))
    return out


def _err(got, want) -> float:
    """max|diff| in units of max|want|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _build(backend: str, cfg, params, dtype="float32"):
    """The model on `backend`, asking for float32 compute (the bound REL_TOL is for float32), and the
    kit's whole-model tolerance for the compute dtype the backend reports it really uses."""
    model = build_model(cfg, params, backend=backend, dtype=dtype)
    return model, tolerance(params.layers[0].wq.raw.fmt, compute_dtype(model.backend), "model")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", _backend_params())
def test_f32_logits_match_reference(backend, config, cases):
    _require(backend)
    cfg, w, ids, ref = cases[config]
    model, tol = _build(backend, cfg, params_from_hf(cfg, w, "f32"))
    assert tol == REL_TOL, f"{backend} computes in {compute_dtype(model.backend)} when asked for float32"
    got = model.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert _err(got, ref) <= REL_TOL, f"{backend} on {config}: relative error {_err(got, ref):.2e}"


@pytest.mark.parametrize("backend", _backend_params())
def test_default_dtype_logits_match_reference(backend, cases):
    """The backend's own default compute dtype (bfloat16 on some CPUs), within the conformance kit's
    whole-model tolerance for that dtype; on the k == E config, so rounding cannot flip a top-k pick."""
    _require(backend)
    cfg, w, ids, ref = cases["dense"]
    model, tol = _build(backend, cfg, params_from_hf(cfg, w, "f32"), dtype=None)
    assert _err(model.logits(ids), ref) <= tol, f"{backend}: relative error {_err(model.logits(ids), ref):.2e} > {tol}"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_configs_catch_each_mistake(config, cases):
    """Each deliberately broken reference differs from the NumPy model by >= 100x the tolerance, so the
    parity test above would fail on a backend that made that mistake."""
    cfg, w, ids, ref = cases[config]
    got = build_model(cfg, params_from_hf(cfg, w, "f32"), backend="numpy").logits(ids)
    assert _err(got, ref) <= REL_TOL
    for flaw in CATCHES[config]:
        broken = reference_logits(cfg, w, ids, flaws=[flaw])
        assert _err(got, broken) > 100 * REL_TOL, f"{config} does not expose {flaw}: {_err(got, broken):.2e}"


def _format_cases():
    """bf16 (the HF checkpoints), Q8_0 and Q4_0 on every backend; f16 on NumPy only (the same
    conversion path as bf16 elsewhere), to keep compiled backends' test time down."""
    out = []
    for p in _backend_params():
        name = p.values[0]
        for fmt in ("bf16", "q8_0", "q4_0") + (("f16",) if name == "numpy" else ()):
            out.append(pytest.param(name, fmt, id=f"{name}-{fmt}", marks=p.marks))
    return out


@pytest.mark.parametrize("backend,fmt", _format_cases())
def test_stored_formats_match_reference_on_dequantised_weights(backend, fmt):
    """Weights stored as `fmt` against the reference run on the same weights dequantised. On the NumPy
    backend (exact dequantisation, float32 compute) as tight as f32: 1e-4 x max|logit|. Other backends
    get the kit's bound for the format and the compute dtype they report (they may quantise activations
    to 8 bits for Q8_0/Q4_0) and, when that bound is loose, route every token to all experts so that
    rounding cannot flip a pick."""
    b = _require(backend)
    cfg, T = CONFIGS["hybrid"]
    if backend != "numpy":
        b = type(b)(dtype="float32")
        assert b.is_available()
    tol = REL_TOL if backend == "numpy" else tolerance(fmt, compute_dtype(b), "model")
    if tol > LOSSY:
        cfg = cfg.replace(moe_num_active_primary_experts=cfg.moe_num_primary_experts)
    model = build_model(cfg, params_from_hf(cfg, random_hf_weights(cfg, seed=3), fmt), backend=backend,
                        dtype="float32")
    assert model.params.layers[0].wq.raw.fmt == fmt          # really stored in that format
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, T)
    ref = reference_logits(cfg, hf_weights_from_params(model.params), ids)
    err = _err(model.logits(ids), ref)
    assert err <= tol, f"{backend} {fmt}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_synth_quantised_model_matches_reference(fmt):
    """st_sdk.synth's in-memory quantised models (what other tests use) on the NumPy backend."""
    from st_sdk import synth

    cfg = CONFIGS["hybrid"][0]
    model = synth.build_model(cfg, seed=5, fmt=fmt)
    assert model.params.layers[1].down.raw.fmt == fmt
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 10)
    ref = reference_logits(cfg, hf_weights_from_params(model.params), ids)
    assert _err(model.logits(ids), ref) <= REL_TOL


def test_reference_reads_gguf_and_hf_layouts_alike():
    """hf_weights_from_params takes a GGUF-style model (experts stacked 3-D) as well as an HF one."""
    from st_sdk.testing.data import random_params

    cfg = CONFIGS["crossed"][0]
    gguf, hf = random_params(cfg, "q8_0", seed=2, layout="gguf"), random_params(cfg, "q8_0", seed=2, layout="hf")
    wg, wh = hf_weights_from_params(gguf), hf_weights_from_params(hf)
    assert sorted(wg) == sorted(wh)
    ids = np.arange(8)
    model = build_model(cfg, gguf, backend="numpy")
    assert _err(model.logits(ids), reference_logits(cfg, wg, ids)) <= REL_TOL


def test_quantisation_is_visible_to_the_reference():
    """hf_weights_from_params really dequantises: q4_0 weights give different logits from the f32 ones
    they came from, by much more than the tolerance (so the test above compares like with like)."""
    cfg = CONFIGS["hybrid"][0]
    w = random_hf_weights(cfg, seed=1)
    ids = np.arange(10)
    q = hf_weights_from_params(params_from_hf(cfg, w, "q4_0"))
    assert not np.array_equal(q["model.layers.0.self_attn.q_proj.weight"], w["model.layers.0.self_attn.q_proj.weight"])
    assert _err(reference_logits(cfg, q, ids), reference_logits(cfg, w, ids)) > 100 * REL_TOL


def test_reference_is_independent_of_the_code_it_checks():
    """The reference computes with NumPy alone: it imports no graph, op, cache, model or backend code
    (its helpers use st_sdk.weights only to read and assemble weights)."""
    import ast
    from pathlib import Path

    import reference

    tree = ast.parse(Path(reference.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("st_sdk") and not m.startswith("st_sdk.weights")}
