"""load(context=N), model.tokenize / model.detokenize."""
import logging

import pytest

import st_sdk
from generation_helpers import tiny_model
from st_sdk.errors import InputError


# ---- context ----------------------------------------------------------------------------------------
def test_context_sizes_requests_and_the_cache(tiny_dir):
    m = st_sdk.load(tiny_dir["gguf"], backend="numpy", context=16)
    assert m.context == 16 and m.config.max_position_embeddings == 2048
    with pytest.raises(InputError, match=r"prompt of 10 tokens \+ max_new_tokens=7 = 17 tokens exceed .*context of 16"):
        m.generate(list(range(10)), max_new_tokens=7)
    res = m.generate(list(range(10)), max_new_tokens=None, ignore_eos=True, seed=0)
    assert len(res.token_ids) == 6 and res.finish_reason == "length"
    with pytest.raises(InputError, match="context of 16"):
        m.logits(list(range(17)))
    s = m.session()
    assert s.capacity == 16 and m.session(capacity=10**6).capacity == 16


def test_context_refuses_what_the_model_cannot_hold(tiny_dir):
    with pytest.raises(InputError, match="context=4096 exceeds the model's max_position_embeddings=2048"):
        st_sdk.load(tiny_dir["gguf"], backend="numpy", context=4096)
    for bad in (0, 1, 2.5, "512", True):
        with pytest.raises(InputError, match="context"):
            st_sdk.load(tiny_dir["gguf"], backend="numpy", context=bad)


def test_default_context_is_the_maximum_capped_by_available_memory(tiny_dir, monkeypatch, caplog):
    import st_sdk.context as context

    m = st_sdk.load(tiny_dir["gguf"], backend="numpy")
    assert m.context == m.config.max_position_embeddings
    cfg = m.config
    monkeypatch.setattr(context, "available_memory", lambda: 2 * cfg.kv_cache_bytes(300))
    with caplog.at_level(logging.WARNING, logger="st_sdk"):
        m = st_sdk.load(tiny_dir["gguf"], backend="numpy")
    assert 300 <= m.context < 310
    assert "context capped to" in caplog.text and "max_position_embeddings=2048" in caplog.text


def test_the_memory_plan_is_sized_by_context(tiny_dir):
    small = st_sdk.load(tiny_dir["gguf"], backend="numpy", max_memory="2GiB", context=64)
    default = st_sdk.load(tiny_dir["gguf"], backend="numpy", max_memory="2GiB")
    assert small.context == 64 and small.memory_plan.kv_bytes == small.config.kv_cache_bytes(64)
    assert default.context == 2048 and default.memory_plan.kv_bytes == default.config.kv_cache_bytes(2048)


# ---- tokenize / detokenize -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_dir):
    return st_sdk.load(tiny_dir["gguf"], backend="numpy")


def test_tokenize_round_trips(model):
    for text in ["Hello, world!", "你好，世界。", "Emoji: 🚀 ✨", " leading and trailing  "]:
        ids = model.tokenize(text)
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert model.detokenize(ids) == text
    assert model.tokenize("Hello") == model.tokenizer.encode("Hello")


def test_special_tokens_in_text_become_their_ids(model):
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    ids = model.tokenize("hi<|im_end|>")
    assert ids[-1] == im_end
    assert model.detokenize(ids) == "hi<|im_end|>"
    assert model.detokenize(ids, skip_special=True) == "hi"


def test_a_cut_character_decodes_to_the_replacement_char(model):
    ids = model.tokenize("🚀")
    assert len(ids) > 1 and "\ufffd" in model.detokenize(ids[:1])
    assert model.detokenize([]) == ""


def test_tokenize_errors(model):
    with pytest.raises(InputError, match="text"):
        model.tokenize(42)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.detokenize([10**6])
    with pytest.raises(InputError, match="ids"):
        model.detokenize(5)
    m = tiny_model()
    m.tokenizer = None
    with pytest.raises(InputError, match="tokenizer"):
        m.tokenize("hi")
