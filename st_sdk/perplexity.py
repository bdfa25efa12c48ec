"""Perplexity of a model on a text and, against a base model, the KL divergence of its predictions:
how llama.cpp's `llama-perplexity --kl-divergence` compares quantised files.

The tokens are cut into chunks of `context` tokens (the last chunk may be shorter); each chunk is a
fresh sequence through `Model.logits`, so every backend and weight format is measured the same way.
Every token after the first of its chunk is scored: its negative log-likelihood, and with a base model
KL(base || model) of the two next-token distributions and whether their most likely tokens agree.
Log-softmax runs in float64 on blocks of rows, so a 151,936-token vocabulary needs no [T, V] float64
array.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import InputError

#: rows of logits turned into float64 log-probabilities at a time
ROW_BLOCK = 64


@dataclass
class KLStats:
    mean: float                 # mean KL(base || model) per scored token, nats
    p99: float                  # 99th percentile
    median: float
    max: float
    top1_agreement: float       # fraction of scored tokens where both models' argmax agree
    base_perplexity: float

    def to_dict(self) -> dict[str, float]:
        return dict(mean=self.mean, p99=self.p99, median=self.median, max=self.max,
                    top1_agreement=self.top1_agreement, base_perplexity=self.base_perplexity)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float                  # mean negative log-likelihood, nats per scored token
    tokens: int                 # tokens in the text
    scored: int                 # tokens scored (all but the first of each chunk)
    chunks: int
    context: int
    vocab_size: int
    kl: KLStats | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(perplexity=self.perplexity, nll=self.nll, tokens=self.tokens, scored=self.scored,
                                 chunks=self.chunks, context=self.context, vocab_size=self.vocab_size)
        if self.kl is not None:
            d["kl_divergence"] = self.kl.to_dict()
        return d


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def chunk_scores(logits: np.ndarray, targets: np.ndarray, base_logits: np.ndarray | None = None):
    """Per scored row: (nll, base nll, KL(base || model), argmax agreement); the base entries are None
    without base logits. logits: [T, V] predicting targets [T]."""
    nll, bnll, kl, agree = [], [], [], []
    for s in range(0, len(targets), ROW_BLOCK):
        lp = log_softmax64(logits[s:s + ROW_BLOCK])
        t = targets[s:s + ROW_BLOCK]
        nll.append(-lp[np.arange(len(t)), t])
        if base_logits is not None:
            bl = log_softmax64(base_logits[s:s + ROW_BLOCK])
            bnll.append(-bl[np.arange(len(t)), t])
            kl.append(np.maximum((np.exp(bl) * (bl - lp)).sum(axis=-1), 0.0))   # >= 0 up to rounding
            agree.append(lp.argmax(axis=-1) == bl.argmax(axis=-1))
    cat = (lambda xs: np.concatenate(xs) if xs else None)
    return cat(nll), cat(bnll), cat(kl), cat(agree)


def default_context(model) -> int:
    return int(min(model.config.max_position_embeddings, 512))


def check_context(model, ids, context: int | None) -> int:
    ctx = default_context(model) if context is None else context
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 2:
        raise InputError(f"context must be an integer >= 2, got {ctx!r}")
    if ctx > model.config.max_position_embeddings:
        raise InputError(f"context {ctx} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    if len(ids) < 2:
        raise InputError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    return ctx


def chunks(n: int, context: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of n tokens; a last chunk of one token is dropped (nothing to score)."""
    return [(s, min(s + context, n)) for s in range(0, n, context) if n - s >= 2]


def chunk_logits(model, ids, context: int | None = None) -> list[np.ndarray]:
    """The float32 logits of each chunk but its last position: what `perplexity(base=...)` compares
    with, computed once to compare many models with one base."""
    ids = np.asarray(ids, dtype=np.int64)
    ctx = check_context(model, ids, context)
    return [model.logits(ids[s:e])[:-1] for s, e in chunks(len(ids), ctx)]


def perplexity(model, ids: Sequence[int] | str, context: int | None = None, base=None,
               progress: bool = False, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` on `ids` (token ids, or text encoded with the model's tokenizer); with
    `base` (another loaded model with the same vocabulary, or its `chunk_logits` on the same ids and
    context) also the KL divergence statistics against it."""
    if isinstance(ids, str):
        if model.tokenizer is None:
            raise InputError(f"{model.path or 'model'}: no tokenizer in the model file, cannot encode the text")
        ids = model.tokenizer.encode(ids)
    ids = np.asarray(ids, dtype=np.int64)
    V = model.config.vocab_size
    ctx = check_context(model, ids, context)
    spans = chunks(len(ids), ctx)
    if isinstance(base, list):
        if len(base) != len(spans) or any(b.shape != (e - s - 1, V) for b, (s, e) in zip(base, spans)):
            raise InputError("base logits do not match these tokens, context and vocabulary")
    elif base is not None and base.config.vocab_size != V:
        raise InputError(f"base model {base.path}: vocabulary of {base.config.vocab_size} tokens, the model has "
                         f"{V}: KL divergence needs the same vocabulary")
    from tqdm import tqdm

    # progress=True: a bar on stderr when it is a terminal
    bar = tqdm(total=sum(e - s for s, e in spans), unit="tok", desc=desc, leave=False,
               disable=None if progress else True)
    parts: list[tuple] = []
    try:
        for j, (s, e) in enumerate(spans):
            chunk = ids[s:e]
            logits = model.logits(chunk)[:-1]
            if base is None:
                base_logits = None
            else:
                base_logits = base[j] if isinstance(base, list) else base.logits(chunk)[:-1]
            parts.append(chunk_scores(logits, chunk[1:], base_logits))
            bar.update(len(chunk))
    finally:
        bar.close()
    nll = np.concatenate([p[0] for p in parts])
    kl = None
    if base is not None:
        bnll = np.concatenate([p[1] for p in parts])
        k = np.concatenate([p[2] for p in parts])
        agree = np.concatenate([p[3] for p in parts])
        kl = KLStats(mean=float(k.mean()), p99=float(np.percentile(k, 99)), median=float(np.median(k)),
                     max=float(k.max()), top1_agreement=float(agree.mean()),
                     base_perplexity=float(np.exp(bnll.mean())))
    return PerplexityResult(perplexity=float(np.exp(nll.mean())), nll=float(nll.mean()), tokens=int(len(ids)),
                            scored=int(len(nll)), chunks=len(spans), context=ctx, vocab_size=V, kl=kl)
