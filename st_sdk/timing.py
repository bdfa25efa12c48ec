"""The one timing harness: auto-selection measurements, `st-sdk bench` and benchmarks/ all use it,
so their figures cannot disagree.

What is timed is a `Runner`: `prefill(ids)` (fresh state, whole prompt, greedy next token) and
`step(token)` (one decode step at batch 1). `ModelRunner` drives an st-sdk `Model`, `LlamaRunner` a
`llama_cpp.Llama`, so our figures and the peer's come from the same code and the same clock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import median, quantiles
from typing import Any, Sequence

import numpy as np


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements; spread is (max - min) / median."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "spread": float("nan"), "n": 0}
    m = median(values)
    return {"median": m, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / m if m else float("nan"), "n": len(values)}


def robust_spread(values: Sequence[float]) -> float:
    """Interquartile range over the median: how much repeated measurements disagree, one outlier aside."""
    if len(values) < 2:
        return float("nan")
    q1, _, q3 = quantiles(values, n=4, method="inclusive")
    m = median(values)
    return (q3 - q1) / m if m else float("nan")


@dataclass
class Timing:
    prefill_s: list[float] = field(default_factory=list)   # one entry per repeat: whole prompt
    decode_s: list[float] = field(default_factory=list)    # one entry per decoded token
    decode_rounds: list[float] = field(default_factory=list)  # tokens/s of each time_decode call
    prompt_len: int = 0
    error: str | None = None   # interleaved_decode: why this model's steps stopped

    @property
    def prefill_tps(self) -> float:
        return self.prompt_len / median(self.prefill_s) if self.prefill_s else float("nan")

    @property
    def decode_tps(self) -> float:
        return 1.0 / median(self.decode_s) if self.decode_s else float("nan")

    def prefill_tps_runs(self) -> list[float]:
        return [self.prompt_len / s for s in self.prefill_s]

    def to_dict(self) -> dict[str, Any]:
        """Medians and spreads of tokens/s: what reports print."""
        pre, dec = summary(self.prefill_tps_runs()), summary(self.decode_rounds)
        return {"prompt_len": self.prompt_len,
                "prefill_tps": self.prefill_tps, "prefill_spread": pre["spread"], "prefill_runs": pre["n"],
                "decode_tps": self.decode_tps, "decode_spread": dec["spread"], "decode_runs": dec["n"],
                "decode_tokens": len(self.decode_s)}


class ModelRunner:
    """Greedy prefill/decode of an st-sdk Model; each prefill starts a fresh session."""

    def __init__(self, model, room: int = 256):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.room = room   # decode tokens a session must hold beyond the prompt
        self.session = None

    def prefill(self, ids: np.ndarray) -> int:
        self.session = self.model.session(capacity=len(ids) + self.room)
        return int(np.argmax(self.session.feed(ids)))

    def step(self, token: int) -> int:
        return int(np.argmax(self.session.feed([token])))


class LlamaRunner:
    """The same two calls on llama.cpp (llama-cpp-python), reading its last-token logits."""

    def __init__(self, llm):
        self.llm = llm
        self.vocab_size = llm.n_vocab()

    def _next(self) -> int:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits(self.llm.ctx)   # the last token's row when logits_all=False
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))))

    def prefill(self, ids: np.ndarray) -> int:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return self._next()

    def step(self, token: int) -> int:
        self.llm.eval([int(token)])
        return self._next()


def as_runner(target) -> ModelRunner | LlamaRunner:
    if isinstance(target, (ModelRunner, LlamaRunner)):
        return target
    if hasattr(target, "session") and hasattr(target, "config"):
        return ModelRunner(target)
    return LlamaRunner(target)


def decode_sparsity(runner, n: int = 32, seed: int = 0) -> dict | None:
    """The backend's sparse ReGLU counters (Backend.sparsity) over `n` decode steps fed random tokens
    (greedy steps on random weights loop and repeat one routing), None where it keeps none."""
    model = getattr(runner, "model", None)
    if model is None:   # llama.cpp
        return None
    rng = np.random.default_rng(seed)
    runner.prefill(prompt_ids(model, 8, seed))
    model.backend.sparsity(reset=True)
    for t in rng.integers(0, model.config.vocab_size, n):
        runner.step(int(t))
    return model.backend.sparsity(reset=True)


def prompt_ids(model, n: int, seed: int = 0) -> np.ndarray:
    vocab = model.config.vocab_size if hasattr(model, "config") else as_runner(model).vocab_size
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


def time_prefill(model, prompt_len: int = 128, repeats: int = 3, timing: Timing | None = None) -> Timing:
    """Wall time of a whole-prompt prefill from an empty state, `repeats` times."""
    t = timing or Timing()
    t.prompt_len = prompt_len
    runner = as_runner(model)
    ids = prompt_ids(runner, prompt_len)
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.prefill(ids)
        t.prefill_s.append(time.perf_counter() - t0)
    return t


def time_decode(model, n_tokens: int = 16, context: int = 16, warmup: int = 2,
                timing: Timing | None = None) -> Timing:
    """Per-token decode times after a `context`-token prompt (greedy, batch 1)."""
    t = timing or Timing()
    runner = as_runner(model)
    if isinstance(runner, ModelRunner):
        runner.room = max(runner.room, warmup + n_tokens + 1)
    _timed_steps(runner, runner.prefill(prompt_ids(runner, context)), warmup, n_tokens, t)
    return t


def _timed_steps(runner, tok: int, warmup: int, n: int, t: Timing) -> int:
    """`warmup` untimed then `n` timed greedy decode steps from `tok`, recorded in `t` (one entry of
    `decode_rounds` for the n); returns the last token."""
    this_round = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        tok = runner.step(tok)
        if i >= warmup:
            this_round.append(time.perf_counter() - t0)
    t.decode_s.extend(this_round)
    if this_round:
        t.decode_rounds.append(len(this_round) / sum(this_round))
    return tok


def interleaved_decode(models: dict[str, Any], rounds: int = 7, block_s: float = 0.05, context: int = 8,
                       warmup: int = 2, max_block: int = 64) -> dict[str, Timing]:
    """Greedy decode steps of several models interleaved round by round, so that a change in the
    machine's load hits them all alike: in each round every model runs one block of steps (about
    `block_s` long, the same number every round), the order rotating from round to round.
    Each Timing's `decode_rounds` holds one tokens/s per round, `decode_s` every step."""
    runners = {n: as_runner(m) for n, m in models.items()}
    timings = {n: Timing() for n in models}
    token, steps = {}, {}
    for n, r in runners.items():   # warm up, and size each model's block from its last warm-up step
        try:
            if isinstance(r, ModelRunner):
                r.room = max(r.room, warmup + rounds * max_block + 1)
            tok = r.prefill(prompt_ids(r, context))
            per = 0.0
            for _ in range(max(warmup, 1)):
                t0 = time.perf_counter()
                tok = r.step(tok)
                per = time.perf_counter() - t0
        except Exception as e:   # a model that fails is dropped; the others are still timed
            timings[n].error = f"{type(e).__name__}: {e}"
            continue
        token[n], steps[n] = tok, max(1, min(max_block, round(block_s / max(per, 1e-9))))
    names = list(token)
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            if timings[n].error is None:
                try:
                    token[n] = _timed_steps(runners[n], token[n], 0, steps[n], timings[n])
                except Exception as e:
                    timings[n].error = f"{type(e).__name__}: {e}"
    return timings


def time_round(model, prompt_len: int, gen_len: int, warmup: int = 1, timing: Timing | None = None,
               seed: int = 0) -> Timing:
    """One benchmark round: a timed prefill of `prompt_len` tokens, then `gen_len` timed decode steps
    continuing from it (after `warmup` untimed ones). What `st-sdk bench` repeats, interleaved."""
    t = timing or Timing()
    t.prompt_len = prompt_len
    runner = as_runner(model)
    if isinstance(runner, ModelRunner):
        runner.room = max(runner.room, warmup + gen_len + 1)
    ids = prompt_ids(runner, prompt_len, seed)
    t0 = time.perf_counter()
    tok = runner.prefill(ids)
    t.prefill_s.append(time.perf_counter() - t0)
    _timed_steps(runner, tok, warmup, gen_len, t)
    return t
