"""Chat templates: jinja2 rendered the way transformers renders them, so model templates behave alike.

A sandboxed environment (templates come from model files), trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text readable.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import TokenizerError

#: ChatML as Qwen2 writes it (a default system prompt when the conversation has none)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           **special_tokens: Any) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a jinja2 chat template."""
    from jinja2 import TemplateError

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TokenizerError("chat template: messages must be a list of {'role': ..., 'content': ...} dicts")
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **special_tokens)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from None
