"""`Request`: one generation as the engine drives it, one step at a time.

The engine asks a request for the ids of its next step (`next_ids`: a chunk of the prompt while it
prefills, then the token it sampled last), feeds them together with the other requests' ids, and hands
back the step's last-position logits (`advance`). Text pieces, the final result or an error go to the
consumer through `events`, a queue read by whatever thread called generate().
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from ..sampling import log_softmax, sample
from .options import Options, eos_ids
from .result import GenerationResult
from .text import IncrementalDecoder, StopStrings


class Request:
    def __init__(self, model, session, prompt_ids: list[int], opts: Options, chunk: int | None = None,
                 events=None, logit_bias: dict[int, float] | None = None):
        cfg = model.config
        self.model, self.session, self.prompt_ids, self.opts = model, session, prompt_ids, opts
        self.cancel = opts.cancel if opts.cancel is not None else threading.Event()
        self.cached = len(session.tokens)
        self.todo = prompt_ids[self.cached:]        # what the session lacks of the prompt
        self.fed = 0                                # of todo
        self.chunk = chunk or model.chunk_size
        self.rng = np.random.default_rng(opts.seed)
        self.stop_ids = set() if opts.ignore_eos else eos_ids(model)
        self.decoder = IncrementalDecoder(model.tokenizer) if model.tokenizer is not None else None
        self.stops = StopStrings(opts.stop)
        self.seen = None
        if opts.sampling.repetition_penalty != 1.0:
            self.seen = np.zeros(cfg.vocab_size, dtype=bool)
            self.seen[prompt_ids] = True
        self.text: list[str] = []
        self.generated: list[int] = []
        self.logprobs: list[float] | None = [] if opts.logprobs else None
        self.top_logprobs: list[dict[int, float]] | None = [] if opts.top_logprobs else None
        # (kind, value, tokens generated so far): ("piece", text), ("done", None), ("error", exception);
        # anything with put() (the server hands in one that wakes its event loop)
        self.events = events if events is not None else queue.SimpleQueue()
        self.bias = None
        if logit_bias:
            self.bias = np.zeros(cfg.vocab_size, np.float32)
            for tok, b in logit_bias.items():
                self.bias[tok] = b
        self.finished = threading.Event()
        self.result: GenerationResult | None = None
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = self.t_prefilled = None
        self.limit = cfg.max_position_embeddings   # tokens the session may hold (the engine may lower it)
        self.n_decode = 0
        self.kv_bytes = 0                           # what the engine reserved for it

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
        return self._sample(logits)

    def _sample(self, logits: np.ndarray) -> bool:
        opts = self.opts
        tok = sample(logits if self.bias is None else logits + self.bias, opts.sampling, self.rng, self.seen)
        self.generated.append(tok)
        if self.seen is not None:
            self.seen[tok] = True
        if self.logprobs is not None:
            lp = log_softmax(logits)
            self.logprobs.append(float(lp[tok]))
            if self.top_logprobs is not None:
                top = np.argsort(-lp, kind="stable")[:opts.top_logprobs]
                self.top_logprobs.append({int(i): float(lp[i]) for i in top})
        if tok in self.stop_ids:
            return self.finish("eos")
        if self.decoder is not None:
            piece, stopped = self.stops.push(self.decoder.push(tok))
            self._emit(piece)
            if stopped:
                return self.finish("stop")
        if opts.max_new_tokens is not None and len(self.generated) >= opts.max_new_tokens:
            return self.finish("length")
        if len(self.session.tokens) + 1 >= self.limit:
            return self.finish("length")   # the sampled token would not fit: context full
        return False

    def _emit(self, piece: str) -> None:
        if piece:
            self.text.append(piece)
            self.events.put(("piece", piece, len(self.generated)))

    def finish(self, reason: str, error: BaseException | None = None) -> bool:
        """End the request: flush held text (unless stopped, cancelled or failed), set the result and
        tell the consumer."""
        if self.result is not None:
            return True
        if self.decoder is not None and reason in ("eos", "length"):
            piece, stopped = self.stops.push(self.decoder.flush())
            if stopped:
                reason = "stop"
            else:
                piece += self.stops.flush()
            self._emit(piece)
        self.result = GenerationResult("".join(self.text), self.generated, self.prompt_ids, reason, self.logprobs,
                                       self.top_logprobs, self.timings())
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
