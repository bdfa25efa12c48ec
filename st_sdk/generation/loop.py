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

from ..errors import InputError
from ..sampling import log_softmax, sample
from .options import Options, encode_prompt, eos_ids
from .result import GenerationResult
from .stream import GenerationStream
from .text import IncrementalDecoder, StopStrings


def run(model, session, prompt_ids: list[int], opts: Options, out: dict) -> Iterator[str]:
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


def start(model, session, prompt_ids: list[int], opts: Options, stream: bool, on_done=None):
    """Run a generation on `session`: drained into a GenerationResult, or as a GenerationStream;
    `on_done(result)` runs when it ends."""
    if opts.stop and model.tokenizer is None:
        raise InputError("stop: stop strings need a tokenizer; this model has none")
    cancel = opts.cancel or threading.Event()
    opts.cancel = cancel
    out: dict = {}
    gen = run(model, session, prompt_ids, opts, out)
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
    ctx = model.config.max_position_embeddings
    return ctx if opts.max_new_tokens is None else min(ctx, n_prompt + opts.max_new_tokens)


def generate(model, prompt, *, stream: bool = False, **kw):
    """Generate from text or token ids. See `Model.generate` and docs/generation.md for the options.
    Returns a GenerationResult, or with stream=True a GenerationStream of text pieces."""
    opts = Options.parse(**kw)
    ids = encode_prompt(model, prompt)
    session = model.session(capacity=capacity(model, len(ids), opts))
    return start(model, session, ids, opts, stream)


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

