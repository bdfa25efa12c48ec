"""The one timing harness: auto-selection measurements, `st-sdk bench` and benchmarks/ all use it,
so their figures cannot disagree."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import median

import numpy as np


@dataclass
class Timing:
    prefill_s: list[float] = field(default_factory=list)   # one entry per repeat: whole prompt
    decode_s: list[float] = field(default_factory=list)    # one entry per decoded token
    prompt_len: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_len / median(self.prefill_s) if self.prefill_s else float("nan")

    @property
    def decode_tps(self) -> float:
        return 1.0 / median(self.decode_s) if self.decode_s else float("nan")


def prompt_ids(model, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n).astype(np.int64)


def time_prefill(model, prompt_len: int = 128, repeats: int = 3, timing: Timing | None = None) -> Timing:
    t = timing or Timing()
    t.prompt_len = prompt_len
    ids = prompt_ids(model, prompt_len)
    for _ in range(repeats):
        s = model.session(capacity=prompt_len + 1)
        t0 = time.perf_counter()
        s.feed(ids)
        t.prefill_s.append(time.perf_counter() - t0)
    return t


def time_decode(model, n_tokens: int = 16, context: int = 16, warmup: int = 2,
                timing: Timing | None = None) -> Timing:
    """Per-token decode times after a `context`-token prompt (greedy, batch 1)."""
    t = timing or Timing()
    s = model.session(capacity=context + warmup + n_tokens + 1)
    logits = s.feed(prompt_ids(model, context))
    for i in range(warmup + n_tokens):
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        logits = s.feed([tok])
        if i >= warmup:
            t.decode_s.append(time.perf_counter() - t0)
    return t
