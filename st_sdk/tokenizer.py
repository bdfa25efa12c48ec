"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special ids and chat template."""
from __future__ import annotations

from typing import Any, Sequence

from .errors import TokenizerError


class Tokenizer:
    def __init__(self, tk, eos_ids: Sequence[int] = (), bos_id: int | None = None,
                 chat_template: str | None = None, source: str = "", special_tokens: dict[str, str] | None = None):
        self.tk = tk                      # tokenizers.Tokenizer
        self.eos_ids = [int(i) for i in eos_ids]
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.source = source
        self.special_tokens = special_tokens or {}   # e.g. {"eos_token": "<|im_end|>"} for templates

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected text (str), got {type(text).__name__}")
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render messages with the model's jinja2 chat template (as transformers does)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source or 'tokenizer'}: the model has no chat template "
                                 "(tokenizer_config.json 'chat_template' or GGUF 'tokenizer.chat_template')")
        from .chat_template import render

        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      **self.special_tokens, **extra)
