"""Chat: messages rendered with the model's chat template, and multi-turn conversations that keep
their KV cache between turns."""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from .loop import start, start_cached
from .prompt_cache import common_prefix
from .options import Options, context_of, encode_prompt, need_tokenizer
from .result import GenerationResult


def check_messages(messages) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise InputError(f"messages[{i}]['role']: expected a non-empty string, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise InputError(f"messages[{i}]['content']: expected a string, got {type(m['content']).__name__}")
    return [dict(m) for m in messages]


def chat_prompt_ids(model, messages) -> list[int]:
    """The ids of messages rendered with the model's chat template, ready for the assistant's turn."""
    tok = need_tokenizer(model, "chat")
    text = tok.apply_chat_template(check_messages(messages), add_generation_prompt=True)
    # the template writes any special tokens itself, as transformers does
    return encode_prompt(model, tok.encode(text, add_special_tokens=False))


def chat(model, messages, *, stream: bool = False, **kw):
    """Answer the last message of a chat. Same options and return types as generate()."""
    opts = Options.parse(**kw)
    ids = chat_prompt_ids(model, messages)
    return start_cached(model, ids, opts, stream)


class Conversation:
    """A multi-turn chat that keeps its KV cache: when the next turn's prompt ids extend what the cache
    holds (the usual case: the template appends the new turn after the old ones), only the new tokens
    are prefilled; otherwise it starts a fresh Session (sliding-window rings cannot be rewound).
    Not thread-safe: one conversation per thread."""

    def __init__(self, model, system: str | None = None, **defaults):
        self.model = model
        self.system = system
        self.defaults = defaults
        Options.parse(**defaults)   # fail now on bad defaults
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.session = None
        self.last_reused = 0      # tokens of the last prompt found in the cache

    def _session_for(self, ids: list[int]):
        s = self.session
        if s is not None and s.rewind(min(common_prefix(s.tokens, ids), len(ids) - 1)):
            return s
        self.session = self.model.session(capacity=context_of(self.model))
        return self.session

    def save(self, path) -> None:
        """Write the history and the KV cache to `path` (see st_sdk.generation.saved for the format)."""
        from .saved import save

        save(self, path)

    @classmethod
    def load(cls, model, path) -> "Conversation":
        """A conversation saved with `save`, in this process, on `model` (the same model, checked)."""
        from .saved import load

        saved = load(model, path)
        conv = cls(model, system=saved["system"], **saved["defaults"])
        conv.messages, conv.session = saved["messages"], saved["session"]
        return conv

    def send(self, text: str, *, stream: bool = False, **kw):
        """Add a user message and generate the assistant's answer (a GenerationResult, or a
        GenerationStream when stream=True); the answer joins the history when generation ends."""
        if not isinstance(text, str) or not text:
            raise InputError("text: expected a non-empty string")
        opts = Options.parse(**{**self.defaults, **kw})
        messages = self.messages + [{"role": "user", "content": text}]
        ids = chat_prompt_ids(self.model, messages)
        session = self._session_for(ids)
        self.last_reused = len(session.tokens)

        def done(res: GenerationResult) -> None:
            if res.finish_reason == "error":       # the cache may hold half a step: do not reuse it
                self.session = None
            elif res.finish_reason != "cancelled":
                self.messages = messages + [{"role": "assistant", "content": res.text}]

        return start(self.model, session, ids, opts, stream, on_done=done)
