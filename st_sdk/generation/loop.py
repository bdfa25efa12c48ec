"""Generation entry points over the model's engine: `generate` for one prompt or a list, `start` for a
prepared session (chat, conversations), `agenerate` as an async iterator.

Every generation runs as a `Request` on `model.engine` (continuous batching, one engine thread per
model), so concurrent calls from threads and lists of prompts share each step's weight reads; the
caller's thread waits on the request's events: drained into a `GenerationResult`, or handed out as a
`GenerationStream` of text pieces.
"""
from __future__ import annotations

from typing import AsyncIterator

import numpy as np

from ..errors import InputError
from .options import Options, context_of, encode_prompt
from .request import Request
from .sampler import Sampler
from .stream import GenerationStream


def start(model, session, prompt_ids: list[int], opts: Options, stream: bool, on_done=None):
    """Run a generation on `session` through the model's engine: drained into a GenerationResult, or
    as a GenerationStream; `on_done(result)` runs when it ends."""
    req = submit(model, session, prompt_ids, opts)
    return _wait(model, req, stream, on_done)


def submit(model, session, prompt_ids: list[int], opts: Options, events=None) -> Request:
    """Queue a generation on the model's engine; `events` (anything with put()) receives its
    ("piece" | "done" | "error", value, tokens generated) events. Raises BusyError when the queue is full."""
    if opts.stop and model.tokenizer is None:
        raise InputError("stop: stop strings need a tokenizer; this model has none")
    ctx = context_of(model)
    if opts.max_new_tokens is not None and len(prompt_ids) + opts.max_new_tokens > ctx:
        raise InputError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={opts.max_new_tokens} = "
                         f"{len(prompt_ids) + opts.max_new_tokens} tokens exceed the model's context of {ctx} tokens "
                         "(lower max_new_tokens, pass max_new_tokens=None to stop when the context is full, or "
                         "load(..., context=N))")
    # made now: bad options (a logit_bias id, a grammar that does not compile) fail before any work
    sampler = Sampler(model, opts, prompt_ids, room=ctx - len(prompt_ids))
    req = Request(model, session, prompt_ids, sampler, chunk=model.engine.chunk, events=events)
    opts.cancel = req.cancel
    return model.engine.submit(req)


def _wait(model, req: Request, stream: bool, on_done=None):
    out: dict = {}
    gen = req.pieces(out, lambda: model.engine.release(req))
    if stream:
        return GenerationStream(gen, out, req.cancel, req.prompt_ids, on_done,
                                release=lambda: model.engine.release(req) or req.result)
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
    Returns a GenerationResult, or with stream=True a GenerationStream of text pieces. A list of
    prompts (texts or id lists) runs them together in the engine's batch and returns a list of those
    (of streams with stream=True), each what the prompt alone would give."""
    if is_batch(prompt):
        # every prompt and option checked before anything is queued: a bad one fails the call, not half of it
        jobs = [(ids, Options.parse(**kw)) for ids in (encode_prompt(model, p) for p in prompt)]
        reqs = []
        try:
            for ids, opts in jobs:
                reqs.append(submit_cached(model, ids, opts))
        except BaseException:
            for r in reqs:
                r.cancel.set()
            raise
        if stream:
            return [_wait(model, r, True, r.on_done) for r in reqs]
        try:
            return [_wait(model, r, False, r.on_done) for r in reqs]
        finally:
            for r in reqs:   # after an error or an interrupt, the others stop too
                r.cancel.set()
    opts = Options.parse(**kw)
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
    """`start` on a session from the model's prompt cache (see submit_cached)."""
    req = submit_cached(model, ids, opts)
    return _wait(model, req, stream, req.on_done)


def submit_cached(model, ids: list[int], opts: Options, events=None) -> Request:
    """`submit` on a session from the model's prompt cache (the longest shared prefix of a recent
    request's KV), given back to the cache when the request ends (`req.on_done`, which the caller
    runs with the result)."""
    session = model.prompt_cache.acquire(ids, capacity(model, len(ids), opts))
    req = submit(model, session, ids, opts, events=events)

    def done(res) -> None:
        if res.finish_reason != "error":       # an error may leave half a step in the cache
            model.prompt_cache.release(session)

    req.on_done = done
    return req


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

