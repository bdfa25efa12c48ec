"""What a caller asks for, validated: the generation options and the prompt."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..sampling import SamplingParams
from .constraint import ConstraintSpec

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Options:
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False       # the sampled ids' log-probabilities
    top_logprobs: int = 0        # also the N most likely ids per step
    cancel: threading.Event | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logits_processors: tuple[Callable, ...] = ()
    constraint: ConstraintSpec | None = None     # json_schema, regex or grammar

    @classmethod
    def parse(cls, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, temperature: float | None = None,
              top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
              repetition_penalty: float | None = None, seed: int | None = None,
              stop: str | Sequence[str] | None = None, ignore_eos: bool = False, logprobs: bool | int = False,
              cancel: threading.Event | None = None, presence_penalty: float | None = None,
              frequency_penalty: float | None = None, logit_bias: Mapping[int, float] | None = None,
              logits_processors: Sequence[Callable] | None = None, json_schema=None, regex: str | None = None,
              grammar: str | None = None, **unknown) -> "Options":
        if unknown:
            from ..arguments import GENERATE_SYNONYMS, unknown_argument

            code = cls.parse.__code__
            known = ["stream", *code.co_varnames[1:code.co_argcount]]
            raise unknown_argument("generate", next(iter(unknown)), known, GENERATE_SYNONYMS)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                           or not isinstance(max_new_tokens, (int, np.integer))
                                           or max_new_tokens < 1):
            raise InputError(f"max_new_tokens: must be a positive integer or None, got {max_new_tokens!r}")
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                     frequency_penalty=frequency_penalty)
        sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None})
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InputError(f"seed: must be a non-negative integer or None, got {seed!r}")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        else:
            stops = tuple(stop) if isinstance(stop, (list, tuple)) else (None,)
            if not all(isinstance(s, str) for s in stops):
                raise InputError(f"stop: expected a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stops):
            raise InputError("stop: stop strings must not be empty")
        if isinstance(logprobs, bool):
            n_top = 0
        elif isinstance(logprobs, (int, np.integer)) and logprobs >= 0:
            n_top = int(logprobs)
        else:
            raise InputError(f"logprobs: expected a bool or a number of top alternatives, got {logprobs!r}")
        if cancel is not None and not hasattr(cancel, "is_set"):
            raise InputError("cancel: expected a threading.Event (or anything with is_set())")
        if logits_processors is None:
            procs: tuple = ()
        elif callable(logits_processors):
            procs = (logits_processors,)
        elif isinstance(logits_processors, (list, tuple)) and all(callable(f) for f in logits_processors):
            procs = tuple(logits_processors)
        else:
            raise InputError("logits_processors: expected a list of callables fn(token_ids, logits) -> logits, "
                             f"got {logits_processors!r}")
        return cls(max_new_tokens=None if max_new_tokens is None else int(max_new_tokens), sampling=sampling,
                   seed=seed, stop=stops, ignore_eos=bool(ignore_eos),
                   logprobs=bool(logprobs), top_logprobs=n_top, cancel=cancel,
                   logit_bias=parse_logit_bias(logit_bias), logits_processors=procs,
                   constraint=ConstraintSpec.parse(json_schema=json_schema, regex=regex, grammar=grammar))


def parse_logit_bias(bias) -> dict[int, float]:
    """{token id: bias}; ids may be given as strings of digits (JSON object keys, as OpenAI sends them).
    A bias is a number or -inf (bans the id)."""
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise InputError(f"logit_bias: expected a dict {{token_id: bias}}, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for k, v in bias.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"logit_bias: keys must be token ids (integers), got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or np.isnan(v) or v == np.inf:
            raise InputError(f"logit_bias[{k}]: expected a number (or -inf to ban the id), got {v!r}")
        out[int(k)] = float(v)
    return out


def eos_ids(model) -> set[int]:
    """Every end-of-sequence id the tokenizer or config knows (SmallThinker has two)."""
    ids = set(int(i) for i in (model.config.eos_token_id or ()))
    tok = model.tokenizer
    if tok is not None:
        ids.update(int(i) for i in (getattr(tok, "eos_ids", None) or ()))
    return ids


def need_tokenizer(model, what: str):
    if model.tokenizer is None:
        raise InputError(f"{what}: this model has no tokenizer; pass token ids instead of text")
    return model.tokenizer


def encode_prompt(model, prompt) -> list[int]:
    """Text (encoded with the model's tokenizer) or a sequence of ids -> validated ids."""
    if isinstance(prompt, str):
        if prompt == "":
            raise InputError("prompt: empty prompt (give some text or token ids)")
        ids = need_tokenizer(model, "prompt").encode(prompt, add_special_tokens=True)
        if not ids:
            raise InputError("prompt: the text encodes to no tokens")
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        if len(prompt) == 0:
            raise InputError("prompt: empty list of token ids")
        ids = prompt
    else:
        raise InputError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")
    ids = model.check_ids(ids, name="prompt")
    ctx = context_of(model)
    if len(ids) >= ctx:
        raise InputError(f"prompt: {len(ids)} tokens leave no room to generate within the model's context of "
                         f"{ctx} tokens")
    return [int(i) for i in ids]


def context_of(model) -> int:
    """The most tokens (prompt and generated) a sequence of this model may hold: `load(context=N)`,
    else the model's max_position_embeddings."""
    return getattr(model, "context", None) or model.config.max_position_embeddings

