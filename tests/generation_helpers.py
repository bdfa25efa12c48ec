"""Helpers for the generation tests: a byte-level tokenizer whose id b is byte b, tiny random models
wearing it, and two test doubles over a real model's forward pass (a scripted next token, a vocabulary
restricted to printable ASCII)."""
from __future__ import annotations

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT, IM_START, IM_END = 256, 257, 258
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer(vocab_size: int = 512):
    """st_sdk Tokenizer: ids 0..255 are the bytes, then the ChatML specials, padded with specials."""
    from tokenizers import AddedToken, Tokenizer as TK, decoders, models, pre_tokenizers

    from st_sdk.tokenizer import Tokenizer

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tk = TK(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    pads = [f"<|pad_{i}|>" for i in range(vocab_size - 256 - len(SPECIALS))]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + pads])
    assert tk.token_to_id("<|im_end|>") == IM_END and tk.get_vocab_size() == vocab_size
    return Tokenizer(tk, eos_ids=[IM_END, ENDOFTEXT], chat_template=CHATML, source="<test bytes>",
                     special_tokens={"eos_token": "<|im_end|>"})


def tiny_model(seed: int = 0, backend: str = "numpy", **overrides):
    """The tiny preset with random weights and the byte tokenizer (NumPy backend unless told)."""
    from st_sdk.synth import build_model, preset_config

    model = build_model(preset_config("tiny", **overrides), seed=seed, backend=backend)
    model.tokenizer = byte_tokenizer(model.config.vocab_size)
    return model


def c_available() -> bool:
    """Whether the C backend is built and runs here."""
    from st_sdk.registry import get_registry

    cls = get_registry().backends().get("c")
    return cls is not None and cls().is_available()


def text_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def script(model, n_prompt: int, ids: list[int]):
    """Make the model emit `ids` after an n_prompt-token prompt, whatever the sampling: the real forward
    still runs (cache, positions, chunking), its logits are replaced by a one-hot of the script."""
    real = model._forward
    V = model.config.vocab_size
    calls = []

    def forward(tok, positions, cache, last_only=False):
        real(tok, positions, cache, last_only)
        calls.append(len(tok))
        rows = positions[-1:] if last_only else positions
        out = np.full((len(rows), V), -50.0, np.float32)
        for r, p in enumerate(rows):
            k = int(p) + 1 - n_prompt
            out[r, ids[k] if 0 <= k < len(ids) else 0] = 50.0
        return out

    model._forward = forward
    return calls


def printable_only(model):
    """Restrict the real logits to printable ASCII and <|im_end|> so generated text re-encodes to the
    same ids (what KV-cache reuse across chat turns needs)."""
    real = model._forward
    mask = np.full(model.config.vocab_size, -1e9, np.float32)
    mask[32:127] = 0.0
    mask[IM_END] = 0.0

    def forward(tok, positions, cache, last_only=False):
        return np.asarray(real(tok, positions, cache, last_only), np.float32) + mask

    model._forward = forward
