"""Constrained decoding: `json_schema=`, `regex=` and `grammar=` (GBNF or Lark), through llguidance.

A `ConstraintSpec` is what the caller asked for, checked without importing anything;
`ConstraintSpec.compile(tokenizer, vocab_size, eos_ids)` makes a `Constraint`, one request's grammar
state. Each step the sampler draws among `constraint.allowed_ids()` (every other id is forbidden),
then calls `constraint.advance(token)`; `constraint.done` is True once the grammar is complete
and nothing more may follow, which ends the generation (finish_reason "stop").

Why llguidance (measured by `benchmarks/constrained_overhead.py` on a 151,936-token Qwen2
vocabulary; figures in docs/generation.md): per token (mask + commit) it is as fast as xgrammar on a
JSON schema (~40 us) and 10x faster on a broad regular expression; a new schema compiles in
milliseconds (xgrammar: ~200 ms, outlines-core: ~10 s, as it builds an index over the whole vocabulary
first); its tokenizer setup is 2.6x faster than xgrammar's; it takes JSON schema, regular expressions,
Lark and llama.cpp's GBNF through one API; and it is a self-contained wheel with no Python
dependencies (xgrammar requires torch, triton and transformers; outlines-core has no grammars).
llama.cpp, vLLM and SGLang offer it as a structured-output backend.

llguidance is an optional dependency (`pip install "st-sdk[structured]"`): it is a compiled wheel, and
st-sdk's pure-NumPy core must install everywhere. Without it, a constrained request raises InputError
saying how to install it.
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

KINDS = ("json_schema", "regex", "grammar")
#: JSON whitespace between tokens: flexible but bounded, as llama.cpp's schema converter does, so a
#: model cannot loop on blanks; a schema's own "x-guidance" options override it
JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}
INSTALL = 'pip install "st-sdk[structured]"'

_tokenizers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()   # tokenizer -> {key: llt}
_lock = threading.Lock()


@dataclass(frozen=True)
class ConstraintSpec:
    kind: str     # one of KINDS
    text: str     # the schema as JSON text, the regex, or the grammar

    @classmethod
    def parse(cls, json_schema=None, regex=None, grammar=None) -> "ConstraintSpec | None":
        given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
                 if v is not None}
        if not given:
            return None
        if len(given) > 1:
            raise InputError(f"{', '.join(given)}: give at most one constraint (json_schema, regex or grammar)")
        (kind, value), = given.items()
        if kind == "json_schema":
            if hasattr(value, "model_json_schema"):          # a pydantic model class
                value = value.model_json_schema()
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise InputError(f"json_schema: not valid JSON: {e}") from None
            if not isinstance(value, (dict, bool)):
                raise InputError(f"json_schema: expected a dict (or its JSON text), got {type(value).__name__}")
            return cls(kind, json.dumps(value))
        if not isinstance(value, str) or not value:
            raise InputError(f"{kind}: expected a non-empty string, got {value!r}")
        return cls(kind, value)

    def compile(self, tokenizer, vocab_size: int, eos_ids) -> "Constraint":
        if tokenizer is None:
            raise InputError(f"{self.kind}: constrained decoding needs the model's tokenizer; this model has none")
        try:
            import llguidance
        except ImportError:
            raise InputError(f"{self.kind}: constrained decoding needs llguidance; install it with `{INSTALL}`") from None
        if self.kind == "json_schema":
            own = json.loads(self.text)
            own = own.get("x-guidance") if isinstance(own, dict) else None
            keep = isinstance(own, dict) and ({"whitespace_flexible", "whitespace_pattern"} & own.keys())
            grammar = llguidance.LLMatcher.grammar_from_json_schema(self.text, defaults=None if keep else JSON_DEFAULTS)
        elif self.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(self.text)
        else:
            try:
                grammar = llguidance.grammar_from("grammar", self.text)   # Lark, or GBNF converted to Lark
            except ValueError as e:
                raise InputError(f"grammar: {e}") from None
        llt = ll_tokenizer(tokenizer, vocab_size, eos_ids)
        matcher = llguidance.LLMatcher(llt, grammar, log_level=0)
        if matcher.is_error():
            raise InputError(f"{self.kind}: {matcher.get_error()}")
        return Constraint(matcher, vocab_size)


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """The llguidance tokenizer of a model's tokenizer (built once per tokenizer: ~1 s on a real
    vocabulary), with every end-of-sequence id as its eos."""
    import llguidance

    key = (int(vocab_size), tuple(sorted(int(i) for i in eos_ids)))
    with _lock:
        hit = _tokenizers.get(tokenizer, {}).get(key)
    if hit is not None:
        return hit
    llt = llguidance.LLTokenizer(tokenizer.tk.to_str(), n_vocab=int(vocab_size), eos_token=list(key[1]) or None)
    with _lock:
        _tokenizers.setdefault(tokenizer, {})[key] = llt
    return llt


class Constraint:
    """One request's grammar state over a vocabulary of `vocab_size` ids."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed_ids(self) -> np.ndarray:
        """int64 ids the grammar allows next (eos ids only where the grammar may end), ascending."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.flatnonzero(np.unpackbits(self._bits.view(np.uint8), count=self.vocab_size, bitorder="little"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise InputError(f"constraint: token {token} is not allowed here ({self.matcher.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow."""
        return self.matcher.is_stopped()
