"""Text generation on top of `Session`: sampling, stopping, streaming, chat and conversations.

One generation is a `Request` that the model's `Engine` drives one step at a time: it prefills the
prompt in chunks, then samples and feeds one token per step, alongside every other running request
(continuous batching). The caller's thread reads its events: `generate(stream=False)` drains them into
a `GenerationResult`, `generate(stream=True)` hands them out as a `GenerationStream`, `agenerate`
drives that stream from a worker thread, and `Conversation` keeps its Session between turns so only
the new tokens of each turn are prefilled.

Modules: `options` (what a caller asks for, validated), `sampler` (one request's token choice, stop
logic and text, driven one token at a time), `constraint` (json_schema / regex / grammar through
llguidance), `request` (one generation as the engine drives it, step by step), `engine` (the
scheduler), `loop` (`generate`, `start`), `stream`, `result`, `text` (detokenising and stop strings),
`conversation` (chat).
"""
from .constraint import ConstraintSpec
from .engine import Engine
from .conversation import Conversation, chat, chat_prompt_ids, check_messages
from .loop import agenerate, generate
from .options import DEFAULT_MAX_NEW_TOKENS, Options, encode_prompt, eos_ids
from .result import FINISH_REASONS, GenerationResult
from .sampler import Sampler, Step
from .stream import GenerationStream
from .text import IncrementalDecoder, StopStrings

__all__ = ["Engine", "Conversation", "chat", "chat_prompt_ids", "check_messages", "agenerate", "generate",
           "DEFAULT_MAX_NEW_TOKENS", "Options", "encode_prompt", "eos_ids", "FINISH_REASONS",
           "GenerationResult", "GenerationStream", "IncrementalDecoder", "StopStrings", "Sampler", "Step",
           "ConstraintSpec"]
