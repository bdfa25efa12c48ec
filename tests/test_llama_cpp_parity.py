"""Our logits against llama.cpp's on the same synthetic GGUF (skipped when llama-cpp-python is absent).

llama.cpp quirks the file is shaped around: it fixes the sliding window at 4096 whatever the file says
(so sequences stay shorter than our window), and it decides NoPE layers by `il % 4 != 0` unless
n_layer == 4, where it ropes every layer: 8 layers keep the hybrid layout meaningful."""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import st_sdk  # noqa: E402
from conftest import rel_err  # noqa: E402
from st_sdk.synth import write_model  # noqa: E402

WINDOW = 64
IDS = [int(i) for i in np.random.default_rng(1).integers(0, 459, 40)]


def llama_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)   # f32 KV cache: f16 alone costs ~1e-3
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32), llm


@pytest.fixture(scope="module")
def gguf8(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("llama"), layers=8, formats="gguf",
                       sliding_window_size=WINDOW)["gguf"]


def test_f32_logits_match_llama_cpp(gguf8):
    ours = st_sdk.load(gguf8, backend="numpy").logits(IDS)
    theirs, _ = llama_logits(gguf8, IDS)
    err = rel_err(theirs, ours)
    print(f"llama.cpp f32 parity: max|diff|/max|logit| = {err:.2e}")
    assert err < 1e-4


def test_q8_0_logits_match_llama_cpp(tmp_path, gguf8):
    """llama.cpp quantises activations to 8 bits for Q8_0 matmuls; we compute in float: a looser bound."""
    from st_sdk.cli import main as cli

    q8 = tmp_path / "q8.gguf"
    assert cli(["quantize", str(gguf8), str(q8), "--type", "q8_0"]) == 0
    ours = st_sdk.load(q8, backend="numpy").logits(IDS)
    theirs, _ = llama_logits(q8, IDS)
    err = rel_err(theirs, ours)
    print(f"llama.cpp q8_0 parity: max|diff|/max|logit| = {err:.2e}")
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99


def test_tokenizer_matches_llama_cpp(gguf8):
    tok = st_sdk.load(gguf8, backend="numpy").tokenizer
    _, llm = llama_logits(gguf8, [1])
    for text in ["Hello, world!", "你好，世界 😀", "  spaces\n\nnew lines", "don't stop 123456"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
