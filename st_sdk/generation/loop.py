"""The generation loop: prefill what the session lacks, then sample and feed one token at a time.

`run` is a Python generator yielding text pieces; `generate(stream=False)` drains it into a
`GenerationResult`, `generate(stream=True)` hands it out as a `GenerationStream`, and `agenerate`
drives that stream from a worker thread.
"""
from __future__ import annotations

import threading
import time
from typing import AsyncIterator, Iterator

import numpy as np

import numpy as np

from ..errors import InputError
from .options import Options, context_of, encode_prompt
from .result import GenerationResult
from .sampler import Sampler
from .stream import GenerationStream


def run(model, session, prompt_ids: list[int], sampler: Sampler, out: dict) -> Iterator[str]:
    """Prefill what `session` does not hold yet, then sample until a stop condition, yielding text pieces.
    Fills `out["result"]` with the GenerationResult when it ends, also when closed early."""
    t_start = time.perf_counter()
    cancel = sampler.opts.cancel
    finish = None
    cached = len(session.tokens)
    prefill_s = decode_s = 0.0
    n_decode = 0

    def result() -> "GenerationResult":
        n_new = len(prompt_ids) - cached
        timings = dict(prompt_tokens=len(prompt_ids), cached_tokens=cached, prefill_s=prefill_s,
                       prefill_tokens_per_s=n_new / prefill_s if prefill_s > 0 and n_new else float("nan"),
                       generated_tokens=len(sampler.token_ids), decode_s=decode_s,
                       decode_tokens_per_s=n_decode / decode_s if decode_s > 0 and n_decode else float("nan"),
                       total_s=time.perf_counter() - t_start)
        return GenerationResult(sampler.text, sampler.token_ids, prompt_ids, finish or sampler.finish_reason,
                                sampler.logprobs, sampler.top_logprobs, timings)

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
            step = sampler.step(logits)
            if step.text:
                yield step.text
            if sampler.finished:
                break
            logits = session.feed([step.token])
            decode_s += time.perf_counter() - t0   # sampling + one forward step
            n_decode += 1
    except GeneratorExit:   # the consumer closed the stream
        finish = "cancelled"
        raise
    except BaseException:
        finish = "error"
        raise
    finally:
        out["result"] = result()


def start(model, session, prompt_ids: list[int], opts: Options, stream: bool, on_done=None):
    """Run a generation on `session`: drained into a GenerationResult, or as a GenerationStream;
    `on_done(result)` runs when it ends."""
    if opts.stop and model.tokenizer is None:
        raise InputError("stop: stop strings need a tokenizer; this model has none")
    ctx = context_of(model)
    if opts.max_new_tokens is not None and len(prompt_ids) + opts.max_new_tokens > ctx:
        raise InputError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={opts.max_new_tokens} = "
                         f"{len(prompt_ids) + opts.max_new_tokens} tokens exceed the model's context of {ctx} tokens "
                         "(lower max_new_tokens, pass max_new_tokens=None to stop when the context is full, or "
                         "load(..., context=N))")
    cancel = opts.cancel or threading.Event()
    opts.cancel = cancel
    # made now: bad options (a logit_bias id, a grammar that does not compile) fail before any work
    sampler = Sampler(model, opts, prompt_ids, room=ctx - len(prompt_ids))
    out: dict = {}
    gen = run(model, session, prompt_ids, sampler, out)
    if stream:
        return GenerationStream(gen, out, cancel, prompt_ids, on_done)
    try:
        for _ in gen:
            pass
    finally:
        if on_done is not None and "result" in out:
            on_done(out["result"])
    return out["result"]


def capacity(model, n_prompt: int, opts: Options) -> int:
    ctx = context_of(model)
    return ctx if opts.max_new_tokens is None else min(ctx, n_prompt + opts.max_new_tokens)


def generate(model, prompt, *, stream: bool = False, **kw):
    """Generate from text or token ids. See `Model.generate` and docs/generation.md for the options.
    Returns a GenerationResult, or with stream=True a GenerationStream of text pieces; a list of
    prompts returns the list of their results, each what the prompt alone would give."""
    opts = Options.parse(**kw)
    if is_batch(prompt):
        if stream:
            raise InputError("stream: a list of prompts cannot be streamed; stream each prompt on its own")
        batch = [encode_prompt(model, p) for p in prompt]     # every prompt checked before any work
        return [start_cached(model, ids, Options.parse(**kw), False) for ids in batch]
    ids = encode_prompt(model, prompt)
    return start_cached(model, ids, opts, stream)


def is_batch(prompt) -> bool:
    """A list of prompts (texts or lists of ids), as opposed to one prompt (a text or a list of ids)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    kinds = {"text" if isinstance(p, str) else "ids" if isinstance(p, (list, tuple, np.ndarray)) else "id"
             for p in prompt}
    if kinds in ({"text"}, {"ids"}):
        return True
    if kinds != {"id"}:
        raise InputError("prompt: expected a text, a list of token ids, or a list of either (not a mix)")
    return False


def start_cached(model, ids: list[int], opts: Options, stream: bool):
    """`start` on a session from the model's prompt cache, given back to it when the request ends."""
    session = model.prompt_cache.acquire(ids, capacity(model, len(ids), opts))

    def done(res: GenerationResult) -> None:
        if res.finish_reason != "error":       # an error may leave half a step in the cache
            model.prompt_cache.release(session)

    return start(model, session, ids, opts, stream, on_done=done)


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

