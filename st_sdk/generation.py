"""Text generation on top of `Session`: sampling, stopping, streaming, chat and conversations.

One generation is a Python generator (`_run`) that prefills the prompt in chunks, then samples and
feeds one token at a time, yielding text pieces. Everything user-facing wraps it:
`generate(stream=False)` drains it into a `GenerationResult`, `generate(stream=True)` hands it out as a
`GenerationStream`, `agenerate` drives that stream from a worker thread, and `Conversation` keeps its
Session between turns so only the new tokens of each turn are prefilled.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import numpy as np

from .errors import InputError
from .sampling import SamplingParams, log_softmax, sample

DEFAULT_MAX_NEW_TOKENS = 256
FINISH_REASONS = ("stop", "eos", "length", "cancelled", "error")


# ---- results ---------------------------------------------------------------------------------
class GenerationResult(str):
    """The generated text (a str) carrying the token ids, why it stopped, log-probabilities and timings.

    token_ids: every sampled id, the end-of-sequence or stop-completing one included (the text excludes
    eos and ends before a stop string). finish_reason: "eos", "stop" (stop string), "length"
    (max_new_tokens or context full), "cancelled", or "error" (seen on a stream whose step raised).
    logprobs: when asked, the model's log-probability of each sampled id (raw logits, before the
    sampling transforms); top_logprobs: when logprobs=N, the N most likely ids per step as {id: logprob}.
    """

    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    timings: dict[str, float]

    def __new__(cls, text: str, token_ids: Sequence[int], prompt_ids: Sequence[int], finish_reason: str,
                logprobs: list[float] | None = None, top_logprobs: list[dict[int, float]] | None = None,
                timings: dict[str, float] | None = None):
        self = super().__new__(cls, text)
        self.token_ids = list(token_ids)
        self.prompt_ids = list(prompt_ids)
        self.finish_reason = finish_reason
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.timings = dict(timings or {})
        return self

    @property
    def text(self) -> str:
        return str.__str__(self)

    @property
    def prefill_tps(self) -> float:
        return self.timings.get("prefill_tokens_per_s", float("nan"))

    @property
    def decode_tps(self) -> float:
        return self.timings.get("decode_tokens_per_s", float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d = dict(text=self.text, token_ids=self.token_ids, prompt_ids=self.prompt_ids,
                 finish_reason=self.finish_reason, timings=self.timings)
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.top_logprobs is not None:
            d["top_logprobs"] = [{str(k): v for k, v in row.items()} for row in self.top_logprobs]
        return d

    def __repr__(self) -> str:
        return (f"GenerationResult({self.text!r}, tokens={len(self.token_ids)}, "
                f"finish_reason={self.finish_reason!r})")


# ---- text: incremental detokenisation and stop strings ----------------------------------------
class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, never splitting a UTF-8 character: a byte-level
    tokenizer decodes an incomplete character to U+FFFD, so a piece ending in it is held until the
    bytes that complete it arrive (the prefix/read-offset scheme of text-generation-inference)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0     # start of the window decoded for context
        self.read = 0       # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) < len(done):
            return ""           # an incomplete character: wait for its next bytes
        # move on even when nothing new was written (special tokens), so the window stays short
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """What is still held (an incomplete character at the very end decodes to U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class StopStrings:
    """Holds back text that may be the start of a stop string, so nothing of a stop string is ever
    emitted; reports the first complete occurrence."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, stopped)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:   # longest suffix of pending that is a proper prefix of some stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---- options -----------------------------------------------------------------------------------
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

    @classmethod
    def parse(cls, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, temperature: float | None = None,
              top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
              repetition_penalty: float | None = None, seed: int | None = None,
              stop: str | Sequence[str] | None = None, ignore_eos: bool = False, logprobs: bool | int = False,
              cancel: threading.Event | None = None, **unknown) -> "Options":
        if unknown:
            from .arguments import GENERATE_SYNONYMS, unknown_argument

            code = cls.parse.__code__
            known = ["stream", *code.co_varnames[1:code.co_argcount]]
            raise unknown_argument("generate", next(iter(unknown)), known, GENERATE_SYNONYMS)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                           or not isinstance(max_new_tokens, (int, np.integer))
                                           or max_new_tokens < 1):
            raise InputError(f"max_new_tokens: must be a positive integer or None, got {max_new_tokens!r}")
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty)
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
        return cls(max_new_tokens=None if max_new_tokens is None else int(max_new_tokens), sampling=sampling,
                   seed=seed, stop=stops, ignore_eos=bool(ignore_eos),
                   logprobs=bool(logprobs), top_logprobs=n_top, cancel=cancel)


def eos_ids(model) -> set[int]:
    """Every end-of-sequence id the tokenizer or config knows (SmallThinker has two)."""
    ids = set(int(i) for i in (model.config.eos_token_id or ()))
    tok = model.tokenizer
    if tok is not None:
        ids.update(int(i) for i in (getattr(tok, "eos_ids", None) or ()))
    return ids


def _tokenizer(model, what: str):
    if model.tokenizer is None:
        raise InputError(f"{what}: this model has no tokenizer; pass token ids instead of text")
    return model.tokenizer


def encode_prompt(model, prompt) -> list[int]:
    """Text (encoded with the model's tokenizer) or a sequence of ids -> validated ids."""
    if isinstance(prompt, str):
        if prompt == "":
            raise InputError("prompt: empty prompt (give some text or token ids)")
        ids = _tokenizer(model, "prompt").encode(prompt, add_special_tokens=True)
        if not ids:
            raise InputError("prompt: the text encodes to no tokens")
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        if len(prompt) == 0:
            raise InputError("prompt: empty list of token ids")
        ids = prompt
    else:
        raise InputError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")
    ids = model.check_ids(ids, name="prompt")
    ctx = model.config.max_position_embeddings
    if len(ids) >= ctx:
        raise InputError(f"prompt: {len(ids)} tokens leave no room to generate within the context length "
                         f"max_position_embeddings={ctx}")
    return [int(i) for i in ids]


# ---- the generation loop -------------------------------------------------------------------------
def _run(model, session, prompt_ids: list[int], opts: Options, out: dict) -> Iterator[str]:
    """Prefill what `session` does not hold yet, then sample until a stop condition, yielding text pieces.
    Fills `out["result"]` with the GenerationResult when it ends, also when closed early."""
    t_start = time.perf_counter()
    cfg = model.config
    ctx = cfg.max_position_embeddings
    rng = np.random.default_rng(opts.seed)
    stop_ids = set() if opts.ignore_eos else eos_ids(model)
    decoder = IncrementalDecoder(model.tokenizer) if model.tokenizer is not None else None
    stops = StopStrings(opts.stop)
    seen = None
    if opts.sampling.repetition_penalty != 1.0:
        seen = np.zeros(cfg.vocab_size, dtype=bool)
        seen[prompt_ids] = True
    cancel = opts.cancel
    text_parts: list[str] = []
    generated: list[int] = []
    logprobs: list[float] | None = [] if opts.logprobs else None
    top_logprobs: list[dict[int, float]] | None = [] if opts.top_logprobs else None
    finish = "length"
    cached = len(session.tokens)
    prefill_s = decode_s = 0.0
    n_decode = 0

    def result() -> "GenerationResult":
        n_new = len(prompt_ids) - cached
        timings = dict(prompt_tokens=len(prompt_ids), cached_tokens=cached, prefill_s=prefill_s,
                       prefill_tokens_per_s=n_new / prefill_s if prefill_s > 0 and n_new else float("nan"),
                       generated_tokens=len(generated), decode_s=decode_s,
                       decode_tokens_per_s=n_decode / decode_s if decode_s > 0 and n_decode else float("nan"),
                       total_s=time.perf_counter() - t_start)
        return GenerationResult("".join(text_parts), generated, prompt_ids, finish, logprobs, top_logprobs, timings)

    try:
        # prefill in chunks, checking for cancellation between them
        todo = prompt_ids[cached:]
        t0 = time.perf_counter()
        logits = None
        chunk = model.chunk_size
        for s in range(0, len(todo), chunk):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                return
            logits = session.feed(todo[s:s + chunk], chunk=chunk)
        prefill_s = time.perf_counter() - t0

        while True:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                return
            t0 = time.perf_counter()
            tok = sample(logits, opts.sampling, rng, seen)
            generated.append(tok)
            if seen is not None:
                seen[tok] = True
            if logprobs is not None:
                lp = log_softmax(logits)
                logprobs.append(float(lp[tok]))
                if top_logprobs is not None:
                    top = np.argsort(-lp, kind="stable")[:opts.top_logprobs]
                    top_logprobs.append({int(i): float(lp[i]) for i in top})
            if tok in stop_ids:
                finish = "eos"
                break
            if decoder is not None:
                piece, stopped = stops.push(decoder.push(tok))
                if piece:
                    text_parts.append(piece)
                    yield piece
                if stopped:
                    finish = "stop"
                    break
            if opts.max_new_tokens is not None and len(generated) >= opts.max_new_tokens:
                break
            if len(session.tokens) + 1 >= ctx:   # the sampled token would not fit: context full
                break
            logits = session.feed([tok])
            decode_s += time.perf_counter() - t0   # sampling + one forward step
            n_decode += 1
        if decoder is not None and finish != "stop":
            # what the decoder held (an incomplete character) and the stop-string hold-back
            piece, stopped = stops.push(decoder.flush())
            if stopped:
                finish = "stop"
            else:
                piece += stops.flush()
            if piece:
                text_parts.append(piece)
                yield piece
    except GeneratorExit:   # the consumer closed the stream
        finish = "cancelled"
        raise
    except BaseException:
        finish = "error"
        raise
    finally:
        out["result"] = result()


# ---- streaming ---------------------------------------------------------------------------------
class GenerationStream:
    """Iterator of text pieces. `.result` is the GenerationResult once iteration ended (exhausted,
    closed or cancelled). `cancel()` may be called from any thread, also during the prompt's prefill;
    `close()` (or leaving a `with` block, or breaking out of a for loop and dropping the stream) ends
    it at once."""

    def __init__(self, gen: Iterator[str], out: dict, cancel: threading.Event, prompt_ids: list[int],
                 on_done=None):
        self._gen = gen
        self._prompt_ids = prompt_ids
        self._out = out
        self._cancel = cancel
        self._on_done = on_done
        self._done = False

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._gen)
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._on_done is not None and "result" in self._out:
                self._on_done(self._out["result"])

    def cancel(self) -> None:
        """Ask the generation to stop at the next chunk or token boundary (thread-safe)."""
        self._cancel.set()

    def close(self) -> None:
        if not self._done:
            self._cancel.set()
            try:
                self._gen.close()
            except ValueError:   # closed from another thread while running: the event stops it
                return
            # closed before the first piece was asked for: the generator never ran
            self._out.setdefault("result", GenerationResult("", [], self._prompt_ids, "cancelled"))
            self._finish()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def result(self) -> GenerationResult | None:
        """The final result once the stream has ended; None while it is still running."""
        return self._out.get("result") if self._done else None


def _start(model, session, prompt_ids: list[int], opts: Options, stream: bool, on_done=None):
    if opts.stop and model.tokenizer is None:
        raise InputError("stop: stop strings need a tokenizer; this model has none")
    cancel = opts.cancel or threading.Event()
    opts.cancel = cancel
    out: dict = {}
    gen = _run(model, session, prompt_ids, opts, out)
    if stream:
        return GenerationStream(gen, out, cancel, prompt_ids, on_done)
    try:
        for _ in gen:
            pass
    finally:
        if on_done is not None and "result" in out:
            on_done(out["result"])
    return out["result"]


def _capacity(model, n_prompt: int, opts: Options) -> int:
    ctx = model.config.max_position_embeddings
    return ctx if opts.max_new_tokens is None else min(ctx, n_prompt + opts.max_new_tokens)


def generate(model, prompt, *, stream: bool = False, **kw):
    """Generate from text or token ids. See `Model.generate` and docs/generation.md for the options.
    Returns a GenerationResult, or with stream=True a GenerationStream of text pieces."""
    opts = Options.parse(**kw)
    ids = encode_prompt(model, prompt)
    session = model.session(capacity=_capacity(model, len(ids), opts))
    return _start(model, session, ids, opts, stream)


async def agenerate(model, prompt, **kw) -> AsyncIterator[str]:
    """Async iterator of the same text pieces as generate(stream=True); each step runs in a worker
    thread so the event loop stays free. Closing the iterator (or cancelling the task) cancels the
    generation."""
    import asyncio

    kw.pop("stream", None)
    it = generate(model, prompt, stream=True, **kw)
    done = object()
    try:
        while True:
            piece = await asyncio.to_thread(next, it, done)
            if piece is done:
                return
            yield piece
    finally:
        it.cancel()
        it.close()


# ---- chat ----------------------------------------------------------------------------------------
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
    tok = _tokenizer(model, "chat")
    text = tok.apply_chat_template(check_messages(messages), add_generation_prompt=True)
    # the template writes any special tokens itself, as transformers does
    return encode_prompt(model, tok.encode(text, add_special_tokens=False))


def chat(model, messages, *, stream: bool = False, **kw):
    """Answer the last message of a chat. Same options and return types as generate()."""
    opts = Options.parse(**kw)
    ids = chat_prompt_ids(model, messages)
    session = model.session(capacity=_capacity(model, len(ids), opts))
    return _start(model, session, ids, opts, stream)


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
        if s is not None and len(s.tokens) < len(ids) and ids[:len(s.tokens)] == s.tokens:
            return s
        self.session = self.model.session(capacity=self.model.config.max_position_embeddings)
        return self.session

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

        return _start(self.model, session, ids, opts, stream, on_done=done)
