"""Text generation on top of `Session`: sampling, stopping, streaming, chat and conversations.

One generation is a Python generator (`loop.run`) that prefills the prompt in chunks, then samples
and feeds one token at a time, yielding text pieces. Everything user-facing wraps it:
`generate(stream=False)` drains it into a `GenerationResult`, `generate(stream=True)` hands it out as
a `GenerationStream`, `agenerate` drives that stream from a worker thread, and `Conversation` keeps
its Session between turns so only the new tokens of each turn are prefilled.

Modules: `options` (what a caller asks for, validated), `sampler` (one request's token choice, stop
logic and text, driven one token at a time by the loop here or by a batching scheduler),
`constraint` (json_schema / regex / grammar through llguidance), `loop` (the generation loop and
`generate`), `stream`, `result`, `text` (detokenising and stop strings), `conversation` (chat).
"""
from .constraint import ConstraintSpec
from .conversation import Conversation, chat, chat_prompt_ids, check_messages
from .loop import agenerate, generate
from .options import DEFAULT_MAX_NEW_TOKENS, Options, encode_prompt, eos_ids
from .result import FINISH_REASONS, GenerationResult
from .sampler import Sampler, Step
from .stream import GenerationStream
from .text import IncrementalDecoder, StopStrings

__all__ = ["Conversation", "chat", "chat_prompt_ids", "check_messages", "agenerate", "generate",
           "DEFAULT_MAX_NEW_TOKENS", "Options", "encode_prompt", "eos_ids", "FINISH_REASONS",
           "GenerationResult", "GenerationStream", "IncrementalDecoder", "StopStrings", "Sampler", "Step",
           "ConstraintSpec"]
