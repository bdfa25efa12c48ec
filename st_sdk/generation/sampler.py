"""`Sampler`: one request's choice of tokens, driven one token at a time.

The plain generate loop and a batching scheduler drive it the same way: options in, logits in, token
out. It owns everything per request that is not the KV cache: the random generator (seed), the
penalties' counts, the constraint's grammar state, the text decoder and the stop logic.

    sampler = Sampler(model, opts, prompt_ids, room=context - len(prompt_ids))
    while not sampler.finished:
        step = sampler.step(logits)        # logits: float32 [V], the model's output at the last position
        send(step.text)                    # UTF-8-complete text, never a piece of a stop string
        if not sampler.finished:
            logits = <feed step.token to the sequence's KV cache>
    sampler.finish_reason                  # "eos" | "stop" | "length"; cancelling is the caller's

`step(logits)` does, in order:
 1. `logit_bias` {id: bias} is added to the logits (a bias of -inf bans an id);
 2. `repetition_penalty` (CTRL rule, prompt and generated ids), then `presence_penalty` and
    `frequency_penalty` (OpenAI's rule, generated ids: logit -= count * frequency + presence);
 3. each of `logits_processors` in turn: `fn(token_ids, logits) -> logits`, with `token_ids` the
    prompt and generated ids so far (int64 [n]) and `logits` float32 [V] (a copy it may change in
    place); it returns float32-convertible [V] logits (-inf bans an id);
 4. the constraint (`json_schema`, `regex` or `grammar`): every id it forbids gets -inf;
 5. temperature, top-k, top-p, min-p and one draw from this request's own numpy Generator(seed).
Then it commits the token: the constraint advances, the text decoder emits the complete characters,
stop strings are checked, and `finish_reason` is set when the token is an end-of-sequence id
("eos"), completes a stop string or the grammar ("stop"), or reaches `max_new_tokens` or `room`
("length"). `step.logprob` / `step.top_logprobs` are the model's own log-probabilities (log-softmax of
the raw logits, before 1-5) when `logprobs` was asked for.

An OpenAI-compatible server maps its request onto `Options.parse` keywords: `response_format`
{"type": "json_schema"} -> `json_schema`, {"type": "json_object"} -> `json_schema={"type": "object"}`,
`logit_bias`, `logprobs`+`top_logprobs` -> `logprobs=N`, `seed`, `stop`, `max_tokens` ->
`max_new_tokens`, `presence_penalty`, `frequency_penalty`, `temperature`, `top_p`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..sampling import apply_presence_frequency, apply_repetition_penalty, candidate_distribution, log_softmax
from .options import Options, eos_ids
from .text import IncrementalDecoder, StopStrings


@dataclass
class Step:
    token: int
    text: str                                   # the text this token completes (may be "")
    finish_reason: str | None                   # set on the request's last step
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class Sampler:
    """One request's sampling state (see the module docstring). Not thread-safe; one per request."""

    def __init__(self, model, opts: Options, prompt_ids, room: int | None = None):
        cfg = model.config
        self.opts = opts
        self.params = opts.sampling
        self.vocab_size = V = cfg.vocab_size
        self.rng = np.random.default_rng(opts.seed)
        self.eos = eos_ids(model)
        self.stop_ids = set() if opts.ignore_eos else self.eos
        self.history = [int(i) for i in prompt_ids]
        limits = [n for n in (opts.max_new_tokens, room) if n is not None]
        self.limit = min(limits) if limits else None
        tok = model.tokenizer
        self.decoder = IncrementalDecoder(tok) if tok is not None else None
        self.stops = StopStrings(opts.stop)
        if opts.stop and tok is None:
            raise InputError("stop: stop strings need a tokenizer; this model has none")
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = np.zeros(V, dtype=bool)
            self.seen[self.history] = True
        self.counts: dict[int, int] = {}
        self.bias_ids, self.bias = self._bias(opts.logit_bias, V)
        self.constraint = None
        if opts.constraint is not None:
            self.constraint = opts.constraint.compile(tok, V, self.eos)
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list[float] | None = [] if opts.logprobs else None
        self.top_logprobs: list[dict[int, float]] | None = [] if opts.top_logprobs else None
        self.finish_reason: str | None = None

    @staticmethod
    def _bias(bias: dict[int, float], V: int):
        bad = [i for i in bias if not 0 <= i < V]
        if bad:
            raise InputError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{V - 1})")
        return np.fromiter(bias, np.int64, len(bias)), np.fromiter(bias.values(), np.float32, len(bias))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    # ---- logits -> token ------------------------------------------------------------------------
    def process(self, logits: np.ndarray) -> np.ndarray:
        """Steps 1-3: the logits before the constraint and the draw (a new float32 array)."""
        x = np.array(logits, dtype=np.float32)
        if len(self.bias_ids):
            x[self.bias_ids] += self.bias
        if self.seen is not None:
            x = apply_repetition_penalty(x, self.seen, self.params.repetition_penalty)
        if self.counts and (self.params.presence_penalty or self.params.frequency_penalty):
            ids = np.fromiter(self.counts, np.int64, len(self.counts))
            x = apply_presence_frequency(x, ids, np.fromiter(self.counts.values(), np.float32, len(ids)),
                                         self.params.presence_penalty, self.params.frequency_penalty)
        for i, fn in enumerate(self.opts.logits_processors):
            out = fn(np.array(self.history, dtype=np.int64), x)
            try:
                x = np.asarray(out, dtype=np.float32)
            except (TypeError, ValueError):
                x = None
            if x is None or x.shape != (self.vocab_size,):
                raise InputError(f"logits_processors[{i}]: must return logits of shape [{self.vocab_size}], "
                                 f"got {type(out).__name__} {getattr(out, 'shape', '')}")
        return x

    def choose(self, logits: np.ndarray) -> int:
        """The next token (does not commit it)."""
        x = self.process(logits)
        sub = None
        if self.constraint is not None:   # step 4: draw among the ids the grammar allows
            sub = self.constraint.allowed_ids()
            x = x[sub]
        if not len(x) or x.max() == -np.inf:
            raise InputError("no token is allowed: logit_bias, logits_processors or the constraint exclude every id")
        ids, p = candidate_distribution(x, self.params)   # penalties are applied already
        if sub is not None:
            ids = sub[ids]
        if len(ids) == 1:
            return int(ids[0])
        j = int(np.searchsorted(np.cumsum(p), self.rng.random(), side="right"))
        return int(ids[min(j, len(ids) - 1)])

    # ---- commit -----------------------------------------------------------------------------------
    def step(self, logits: np.ndarray) -> Step:
        """Choose the next token from `logits` [V] and commit it."""
        if self.finished:
            raise InputError(f"sampler: the request already finished ({self.finish_reason})")
        tok = self.choose(logits)
        lp = top = None
        if self.logprobs is not None:
            ls = log_softmax(np.asarray(logits))
            lp = float(ls[tok])
            self.logprobs.append(lp)
            if self.top_logprobs is not None:
                best = np.argsort(-ls, kind="stable")[:self.opts.top_logprobs]
                top = {int(i): float(ls[i]) for i in best}
                self.top_logprobs.append(top)
        return Step(tok, self.commit(tok), self.finish_reason, lp, top)

    def commit(self, tok: int) -> str:
        """Record `tok` as generated (sampled here or forced by the caller); returns the text it completes
        and sets `finish_reason` when it ends the request."""
        tok = int(tok)
        self.token_ids.append(tok)
        self.history.append(tok)
        if self.seen is not None:
            self.seen[tok] = True
        self.counts[tok] = self.counts.get(tok, 0) + 1
        piece, hit = "", False
        if tok in self.stop_ids:
            self.finish_reason = "eos"
        else:
            if self.constraint is not None:
                self.constraint.advance(tok)
            if self.decoder is not None:
                piece, hit = self.stops.push(self.decoder.push(tok))
            if hit or (self.constraint is not None and self.constraint.done):
                self.finish_reason = "stop"
            elif self.limit is not None and len(self.token_ids) >= self.limit:
                self.finish_reason = "length"
        if self.finished and not hit and self.decoder is not None:
            # the end: what the decoder held (an incomplete character) and the stop-string hold-back
            more, hit = self.stops.push(self.decoder.flush())
            if hit:
                self.finish_reason = "stop"
            else:
                more += self.stops.flush()
            piece += more
        self.text_parts.append(piece)
        return piece
