"""Every row of the table of files people download (Q4_0, Q4_K_M, Q4_K_S, Q3_K_M, Q5_K_M, Q6_K, Q2_K,
IQ4_NL, Q8_0), written by llama.cpp's quantiser, loads on numpy, c, torch and jax and agrees with
llama.cpp's logits on the same file. Without llama-cpp-python the same checks run on files written by
`st-sdk quantize`, against the NumPy reference (gguf-py's dequantisation).

The model is small but shaped so the k-quants apply (every row a multiple of 256), tied like the 4B
(so the embedding takes the LM head's q6_k), 8 layers (llama.cpp ropes every layer of a 4-layer model).

What agreement means on random weights: llama.cpp rounds every activation to 8 bits before its
integer dot products, which moves its logits ~1% of their range from a float computation of the same
weights, and a random model's logits are flat: at about a third of the positions the top two are
closer than that, and which one wins is decided by rounding (llama.cpp's own float path would
disagree with it there as often). So the argmax must agree on at least 95% of the positions where
llama.cpp's top two logits are more than 2% of the logit range apart; the agreement over all
positions, the median and the max relative error are printed (run with -s). The max includes the
rare token where a router's top-k flips on a near-tie, which moves that token's logits by up to ~10%."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import st_sdk
from st_sdk.synth import write_model
from st_sdk.weights import open_model
from st_sdk.weights.mixes import tensor_types

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
WINDOW = 128
SHAPE = dict(layers=8, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             moe_num_primary_experts=4, moe_num_active_primary_experts=2, moe_ffn_hidden_size=256,
             tie_word_embeddings=True, sliding_window_size=WINDOW)
IDS = [int(i) for i in np.random.default_rng(7).integers(0, 459, 64)]   # shorter than the window
#: the issue's rows: mix -> the types llama.cpp writes for it (besides f32 norms and routers)
ROWS = {
    "q4_0": {"q4_0", "q6_k"}, "q4_k_m": {"q4_k", "q6_k"}, "q4_k_s": {"q4_k", "q5_k", "q6_k"},
    "q3_k_m": {"q3_k", "q4_k", "q5_k", "q6_k"}, "q5_k_m": {"q5_k", "q6_k"}, "q6_k": {"q6_k"},
    "q2_k": {"q2_k", "q3_k", "q4_k", "q6_k"}, "iq4_nl": {"iq4_nl", "q5_k", "q6_k"}, "q8_0": {"q8_0"},
}
BACKENDS = ("numpy", "c", "torch", "jax")
ARGMAX = 0.95      # on positions whose top-2 margin (llama.cpp's) exceeds ...
DECISIVE = 0.02    # ... this fraction of the logit range
MEDIAN = 0.03      # median over positions of max|diff| / max|logit|
MAX = 0.15
WRITER = "llama.cpp" if HAVE_LLAMA else "st-sdk"


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("types"), preset="tiny", formats="gguf", seed=11, **SHAPE)["gguf"]


_files: dict[str, object] = {}
_peer: dict[str, np.ndarray] = {}


def quantised(f32_file, mix: str, tmp_path_factory):
    if mix not in _files:
        from st_sdk.weights.requantize import quantize_gguf

        out = tmp_path_factory.mktemp("types") / f"{mix}.gguf"
        if not HAVE_LLAMA and mix == "iq4_nl":
            pytest.skip("st-sdk has no iq4_nl quantiser and llama-cpp-python is not installed")
        quantize_gguf(f32_file, out, mix, quantizer=WRITER, threads=2)
        _files[mix] = out
    return _files[mix]


def peer_logits(path, mix: str) -> np.ndarray:
    """llama.cpp's logits on the file (f32 KV cache), else the NumPy reference's."""
    if mix not in _peer:
        if HAVE_LLAMA:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                                  type_k=0, type_v=0)
            llm.eval(IDS)
            _peer[mix] = np.array(llm.scores[:len(IDS)], dtype=np.float32)
            llm.close()
        else:
            _peer[mix] = st_sdk.load(path, backend="numpy").logits(IDS)
    return _peer[mix]


_backends: dict[str, object] = {}


def _backend(name: str):
    """One instance per backend for every file: jax compiles its step once for the shape they share."""
    if name not in _backends:
        from st_sdk.registry import get_registry

        cls = get_registry().backends()[name]
        _backends[name] = cls(n_threads=2) if name == "c" else cls(dtype="float32") if name != "numpy" else cls()
    return _backends[name]


@pytest.mark.parametrize("mix", ROWS)
def test_the_file_holds_the_types_of_its_row(f32_file, mix, tmp_path_factory):
    path = quantised(f32_file, mix, tmp_path_factory)
    mf = open_model(path)
    stored = {n: mf.get(n).fmt for n in mf.names}
    assert set(stored.values()) - {"f32"} == ROWS[mix]
    assert stored == tensor_types(mf.config, mix)   # st-sdk's mix rules are llama.cpp's


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ROWS)
def test_every_backend_agrees_with_the_peer(f32_file, mix, backend, tmp_path_factory):
    if backend in ("torch", "jax"):
        pytest.importorskip(backend)
    path = quantised(f32_file, mix, tmp_path_factory)
    want = peer_logits(path, mix)
    got = st_sdk.load(path, backend=_backend(backend)).logits(IDS)
    scale = np.abs(want).max()
    top2 = np.sort(want, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE * scale
    same = got.argmax(-1) == want.argmax(-1)
    per_position = np.abs(got - want).max(-1) / scale
    print(f"\n{WRITER}-written {mix} on {backend} vs {'llama.cpp' if HAVE_LLAMA else 'numpy'}: argmax "
          f"{same[decisive].mean():.0%} of {decisive.sum()} decisive positions, {same.mean():.0%} of all; "
          f"rel err median {np.median(per_position):.1e}, max {per_position.max():.1e}")
    assert decisive.sum() >= len(IDS) // 3
    assert same[decisive].mean() >= ARGMAX
    assert np.median(per_position) < MEDIAN and per_position.max() < MAX


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("mix", [m for m in ROWS if m != "iq4_nl"])   # st-sdk has no iq4_nl quantiser
def test_st_sdk_quantize_writes_what_llama_cpp_writes(f32_file, mix, tmp_path, tmp_path_factory):
    """Same types, same bytes (the C k-quant quantisers are llama.cpp's search, gguf-py's rounding is
    ggml's reference), and llama.cpp loads the file and computes the same logits from it."""
    from st_sdk.weights.requantize import quantize_gguf

    theirs = quantised(f32_file, mix, tmp_path_factory)
    ours = tmp_path / f"{mix}.gguf"
    assert quantize_gguf(f32_file, ours, mix, quantizer="st-sdk") == "st-sdk"
    a, b = open_model(ours), open_model(theirs)
    assert sorted(a.names) == sorted(b.names)
    for n in a.names:
        ta, tb = a.get(n), b.get(n)
        assert ta.fmt == tb.fmt, n
        np.testing.assert_array_equal(ta.data, tb.data, err_msg=n)
    _peer.pop("ours", None)
    np.testing.assert_array_equal(peer_logits(ours, "ours"), peer_logits(theirs, mix))
