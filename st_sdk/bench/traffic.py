"""The weight bytes one decoded token reads: decode is memory-bound, so these bytes over the measured
read bandwidth give a decode ceiling."""
from __future__ import annotations

import os

from ..loader import weight_format
from ..weights import open_model


def bytes_per_token(params, cfg) -> int:
    """Weight bytes one decode step reads: dense parts of every layer, k of E experts, the final norm,
    one embedding row and the head."""
    k, E = cfg.moe_num_active_primary_experts, cfg.moe_num_primary_experts
    total = params.embed.raw.nbytes // cfg.vocab_size + params.norm.raw.nbytes + params.head.raw.nbytes
    for lp in params.layers:
        total += sum(getattr(lp, f).raw.nbytes for f in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "router"))
        total += sum(getattr(lp, f).raw.nbytes for f in ("gate", "up", "down")) * k // E
    return int(total)


def gguf_bytes_per_token(path: str | os.PathLike) -> int:
    """The same count for a model file, read through st-sdk's own (fast) reader without a backend."""
    f = open_model(path)
    return bytes_per_token(f.params(), f.config)


def gguf_format(path: str | os.PathLike) -> str:
    """The dominant weight type of a model file (by bytes), as an st-sdk format name."""
    return weight_format(open_model(path).params())
