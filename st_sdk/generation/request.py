"""`Request`: one generation as the engine drives it, one step at a time.

The engine asks a request for the ids of its next step (`next_ids`: a chunk of the prompt while it
prefills, then the token it sampled last), feeds them together with the other requests' ids, and hands
back the step's last-position logits (`advance`), from which the request's `Sampler` chooses the next
token (options, penalties, constraints, seed, stop strings: generation/sampler.py). Text pieces, the final result or an error go to the
consumer through `events`, a queue read by whatever thread called generate().
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from .result import GenerationResult
from .sampler import Sampler


class Request:
    def __init__(self, model, session, prompt_ids: list[int], sampler: Sampler, chunk: int | None = None,
                 events=None):
        opts = sampler.opts
        self.model, self.session, self.prompt_ids, self.opts, self.sampler = model, session, prompt_ids, opts, sampler
        self.cancel = opts.cancel if opts.cancel is not None else threading.Event()
        self.cached = len(session.tokens)
        self.todo = prompt_ids[self.cached:]        # what the session lacks of the prompt
        self.fed = 0                                # of todo
        self.chunk = chunk or model.chunk_size
        # (kind, value, tokens generated so far): ("piece", text), ("done", None), ("error", exception);
        # anything with put() (the server hands in one that wakes its event loop)
        self.events = events if events is not None else queue.SimpleQueue()
        self.finished = threading.Event()
        self.result: GenerationResult | None = None
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = self.t_prefilled = None
        self.n_decode = 0
        self.kv_bytes = 0                           # what the engine reserved for it

    # what the sampler chose so far (the server reads these for streamed logprobs)
    @property
    def generated(self) -> list[int]:
        return self.sampler.token_ids

    @property
    def logprobs(self) -> list[float] | None:
        return self.sampler.logprobs

    @property
    def top_logprobs(self) -> list[dict[int, float]] | None:
        return self.sampler.top_logprobs

    # ---- what the engine asks ---------------------------------------------------------------------
    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.todo)

    def next_ids(self) -> list[int]:
        """The ids this request feeds in the next step."""
        if self.prefilling:
            return self.todo[self.fed:self.fed + self.chunk]
        return [self.generated[-1]]

    def advance(self, n_fed: int, logits: np.ndarray) -> bool:
        """The step fed `n_fed` ids and returned `logits` [V]; sample when the prompt is in. True when
        the request has finished (its result is then set)."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        if self.prefilling:
            self.fed += n_fed
            if self.prefilling:
                return False
            self.t_prefilled = now
        else:
            self.n_decode += 1
        step = self.sampler.step(logits)
        self._emit(step.text)
        return self.finish(step.finish_reason) if step.finish_reason else False

    def _emit(self, piece: str) -> None:
        if piece:
            self.events.put(("piece", piece, len(self.generated)))

    def finish(self, reason: str, error: BaseException | None = None) -> bool:
        """End the request (the sampler's reason, or "cancelled" / "error"), set the result and tell the
        consumer."""
        if self.result is not None:
            return True
        sp = self.sampler
        self.result = GenerationResult(sp.text, sp.token_ids, self.prompt_ids, reason, sp.logprobs, sp.top_logprobs,
                                       self.timings())
        self.events.put(("error", error, len(self.generated)) if error is not None
                        else ("done", None, len(self.generated)))
        self.finished.set()
        return True

    def timings(self) -> dict[str, float]:
        end = time.perf_counter()
        n_new = len(self.todo)
        start = self.t_admit or self.t_submit
        prefill_s = (self.t_prefilled or end) - start if n_new else 0.0
        decode_s = end - self.t_prefilled if self.t_prefilled is not None else 0.0
        nan = float("nan")
        return dict(prompt_tokens=len(self.prompt_ids), cached_tokens=self.cached, prefill_s=prefill_s,
                    prefill_tokens_per_s=n_new / prefill_s if prefill_s > 0 and n_new else nan,
                    generated_tokens=len(self.generated), decode_s=decode_s,
                    decode_tokens_per_s=self.n_decode / decode_s if decode_s > 0 and self.n_decode else nan,
                    queued_s=start - self.t_submit,
                    time_to_first_token_s=(self.t_prefilled - self.t_submit) if self.t_prefilled else nan,
                    total_s=end - self.t_submit)

    # ---- what the consumer reads ------------------------------------------------------------------
    def pieces(self, out: dict, release):
        """Generator of the text pieces; fills out["result"]. Leaving it early (close, an exception in
        the consumer) cancels the request and waits until the engine has let go of its session."""
        try:
            while True:
                kind, value, _ = self.events.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if self.result is None:
                self.cancel.set()
                release()
            if self.result is not None:
                out["result"] = self.result
