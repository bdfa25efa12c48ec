"""Next-token sampling over one row of logits (NumPy, vectorised).

Order of the transforms (as in Hugging Face transformers): repetition penalty, temperature, top-k,
top-p, min-p, then one draw from the renormalised distribution. Temperature 0 is greedy (argmax after
the repetition penalty; the other filters cannot change the argmax). Presence and frequency penalties
(OpenAI's rule, over the generated ids) are applied by `generation.sampler.Sampler` with the
repetition penalty; ids whose logit is -inf (a constraint's mask, a -inf logit_bias) are never drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

# The SmallThinker authors' recommended sampling (model card / generation_config.json).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_K = 20
DEFAULT_TOP_P = 0.95


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K          # 0 (or >= vocab) keeps every token
    top_p: float = DEFAULT_TOP_P        # 1.0 disables
    min_p: float = 0.0                  # 0.0 disables; else drop p < min_p * p_max
    repetition_penalty: float = 1.0     # 1.0 disables; CTRL rule over prompt + generated ids
    presence_penalty: float = 0.0       # 0.0 disables; subtracted once from every generated id's logit
    frequency_penalty: float = 0.0      # 0.0 disables; subtracted once per occurrence of a generated id

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise InputError(f"{name}: expected a finite number, got {v!r}")
            return float(v)

        if number("temperature") < 0:
            raise InputError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InputError(f"top_k: must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not 0.0 < number("top_p") <= 1.0:
            raise InputError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise InputError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if number("repetition_penalty") <= 0:
            raise InputError(f"repetition_penalty: must be > 0 (1 = disabled), got {self.repetition_penalty!r}")
        number("presence_penalty")
        number("frequency_penalty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL / HF rule: for every id already seen, divide a positive logit by the penalty and multiply a
    negative one by it, so penalty > 1 always makes a repeat less likely. `seen` is a bool mask [V]."""
    if penalty == 1.0 or not seen.any():
        return logits
    out = logits.copy()
    x = out[seen]
    out[seen] = np.where(x > 0, x / penalty, x * penalty)
    return out


def apply_presence_frequency(logits: np.ndarray, ids: np.ndarray, counts: np.ndarray, presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's rule: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, for the generated
    ids `ids` (unique) seen `counts` times. Positive values discourage repeats, negative ones
    encourage them."""
    if (presence == 0.0 and frequency == 0.0) or len(ids) == 0:
        return logits
    out = logits.copy()
    out[ids] -= counts * frequency + presence
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values, without a full-vocabulary argpartition: the k-th largest of a strided
    subsample is a lower bound of the k-th largest overall, so everything above it is a small superset."""
    V = x.shape[-1]
    stride = max(1, V // max(2048, 64 * k))
    sub = x[::stride]
    bound = np.partition(sub, len(sub) - k)[len(sub) - k]
    ids = np.flatnonzero(x >= bound)
    if len(ids) > k:
        ids = ids[np.argpartition(x[ids], len(ids) - k)[len(ids) - k:]]
    return ids


def candidate_distribution(logits: np.ndarray, params: SamplingParams,
                           seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ids that survive the filters and their renormalised probabilities (float64, descending;
    ties in id order). Greedy gives the single argmax with probability 1."""
    x = np.asarray(logits)
    if seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return np.array([int(np.argmax(x))], dtype=np.int64), np.ones(1)
    V = x.shape[-1]
    T = params.temperature
    if 0 < params.top_k < V:
        ids = np.sort(_top_k_ids(x, params.top_k))
        ids = ids[x[ids] > -np.inf]          # fewer than k allowed ids: the k-th largest is -inf
    else:
        # tokens e^-50 below the best carry less than V * 2e-22 of the mass: not worth sorting
        ids = np.flatnonzero(x >= x.max() - 50.0 * T)
    z = x[ids].astype(np.float64) / T
    order = np.argsort(-z, kind="stable")
    ids, z = ids[order], z[order]
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = np.ones(len(ids), dtype=bool)
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        keep &= (np.cumsum(p) - p) < params.top_p
    if params.min_p > 0.0:
        keep &= p >= params.min_p * p[0]
    ids, p = ids[keep], p[keep]
    return ids.astype(np.int64, copy=False), p / p.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> int:
    """Draw one token id from a [V] row of logits."""
    ids, p = candidate_distribution(logits, params, seen)
    if len(ids) == 1:
        return int(ids[0])
    j = int(np.searchsorted(np.cumsum(p), rng.random(), side="right"))
    return int(ids[min(j, len(ids) - 1)])
