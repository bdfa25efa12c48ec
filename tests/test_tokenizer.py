"""Tokenizers from HF directories and from GGUF metadata alone; chat templates rendered like transformers."""
from __future__ import annotations

import pytest

from st_sdk.chat_template import CHATML_TEMPLATE, render
from st_sdk.errors import TokenizerError
from st_sdk.tokenizer import Tokenizer
from st_sdk.weights import open_model

SAMPLES = [
    "Hello, world! How's it going?",
    "你好，世界。今天天气很好。",
    "Emoji: 😀🚀✨ 👍🏽 family 👨‍👩‍👧",
    "  leading spaces\n\ttabs\r\nand   runs   of spaces  ",
    "def f(x):\n    return x ** 2  # ünïcödé",
    "Mixed 123,456.78 and 'quotes' and \"doubles\" and don't",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    return open_model(tiny_dir["hf"]).tokenizer


@pytest.fixture(scope="module")
def gguf_tok(tiny_dir):
    return open_model(tiny_dir["gguf"]).tokenizer


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(hf_tok, text):
    ids = hf_tok.encode(text)
    assert ids and max(ids) < 512
    assert hf_tok.decode(ids, skip_special_tokens=False) == text


def test_cjk_and_emoji_use_byte_tokens(hf_tok):
    # a character outside the merges still encodes (byte-level) and decodes whole
    ids = hf_tok.encode("𝄞")
    assert len(ids) == 4 and hf_tok.decode(ids) == "𝄞"


def test_special_tokens_are_single_ids(hf_tok):
    im_start, im_end = hf_tok.token_to_id("<|im_start|>"), hf_tok.token_to_id("<|im_end|>")
    assert hf_tok.encode("<|im_start|>user<|im_end|>")[0] == im_start
    assert hf_tok.encode("<|im_start|>user<|im_end|>")[-1] == im_end
    assert hf_tok.decode([im_start, im_end], skip_special_tokens=True) == ""


def test_gguf_tokenizer_equals_hf(hf_tok, gguf_tok):
    for text in SAMPLES:
        assert gguf_tok.encode(text) == hf_tok.encode(text), text
        ids = hf_tok.encode(text)
        assert gguf_tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert sorted(gguf_tok.eos_ids) == sorted(hf_tok.eos_ids)
    assert gguf_tok.chat_template == hf_tok.chat_template


def test_two_eos_ids(hf_tok):
    """SmallThinker stops on <|im_end|> and <|endoftext|>."""
    assert set(hf_tok.eos_ids) == {hf_tok.token_to_id("<|im_end|>"), hf_tok.token_to_id("<|endoftext|>")}


def test_chatml_rendering(hf_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"}]
    assert hf_tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = hf_tok.apply_chat_template(msgs[1:], add_generation_prompt=False)
    assert no_prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert not no_prompt.endswith("assistant\n")


def test_template_helpers_like_transformers():
    t = ("{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}"
         "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ strftime_now('%Y') | length }}")
    out = render(t, [{"role": "user", "content": "é"}])
    assert out.startswith('{"role": "user", "content": "é"}') and out.endswith("4")
    with pytest.raises(TokenizerError, match="need a message"):
        render(t, [])
    with pytest.raises(TokenizerError, match="compile"):
        render("{% for %}", [])


def test_template_is_sandboxed():
    with pytest.raises(TokenizerError):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


def test_no_template_is_a_clear_error(hf_tok):
    t = Tokenizer(hf_tok.tk, source="x")
    with pytest.raises(TokenizerError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_synthetic_tokenizer_is_deterministic_and_padded():
    a, b = Tokenizer.synthetic(512), Tokenizer.synthetic(512)
    assert a.tk.to_str() == b.tk.to_str()
    assert a.vocab_size <= 512 and len(a.gguf_metadata(512)["tokenizer.ggml.tokens"]) == 512
    assert CHATML_TEMPLATE == a.chat_template
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.synthetic(100)


def test_gguf_model_types_other_than_bpe_fail_clearly():
    with pytest.raises(TokenizerError, match="llama"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"}, source="m.gguf")
    assert Tokenizer.from_gguf_metadata({}) is None
