"""Every row of the table of files people download (Q4_0, Q4_K_M, Q4_K_S, Q3_K_M, Q5_K_M, Q6_K, Q2_K,
IQ4_NL, Q8_0), written by llama.cpp's quantiser, loads on numpy, c, torch and jax and agrees with
llama.cpp's logits on the same file. Without llama-cpp-python the same checks run on files written by
`st-sdk quantize`, against the NumPy reference (gguf-py's dequantisation).

The model is small but shaped so the k-quants apply (every row a multiple of 256), tied like the 4B
(so the embedding takes the LM head's q6_k), 8 layers (llama.cpp ropes every layer of a 4-layer model).
Run with -s to see each type's max relative error and argmax agreement per backend."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import st_sdk
from conftest import rel_err
from st_sdk.synth import write_model
from st_sdk.weights import open_model
from st_sdk.weights.mixes import tensor_types

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
WINDOW = 64
SHAPE = dict(layers=8, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             moe_num_primary_experts=4, moe_num_active_primary_experts=2, moe_ffn_hidden_size=256,
             tie_word_embeddings=True, sliding_window_size=WINDOW)
IDS = [int(i) for i in np.random.default_rng(7).integers(0, 459, 40)]
#: the issue's rows: mix -> the types llama.cpp writes for it (besides f32 norms and routers)
ROWS = {
    "q4_0": {"q4_0", "q6_k"}, "q4_k_m": {"q4_k", "q6_k"}, "q4_k_s": {"q4_k", "q5_k", "q6_k"},
    "q3_k_m": {"q3_k", "q4_k", "q5_k", "q6_k"}, "q5_k_m": {"q5_k", "q6_k"}, "q6_k": {"q6_k"},
    "q2_k": {"q2_k", "q3_k", "q4_k", "q6_k"}, "iq4_nl": {"iq4_nl", "q5_k", "q6_k"}, "q8_0": {"q8_0"},
}
BACKENDS = ("numpy", "c", "torch", "jax")
ARGMAX = 0.95
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
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    err = rel_err(got, want)
    print(f"\n{WRITER}-written {mix} on {backend} vs {'llama.cpp' if HAVE_LLAMA else 'numpy'}: "
          f"argmax {agree:.0%}, max rel err {err:.2e}")
    assert agree >= ARGMAX
    assert err < 0.05
