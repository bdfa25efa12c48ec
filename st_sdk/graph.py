"""The SmallThinker forward pass, written once against the bound op table.

Reads top to bottom like the forward pass in docs/model.md. Every op is a plain callable of the
chosen backend (or the NumPy reference fallback). The NumPy, torch and jax backends all run this
code: jax traces it inside its compiled step, with an op table of jax functions. The one exception
is the C backend's fused step (`csrc/st_kernels.c`), held to this graph by the conformance kit
(st_sdk.testing: its `layer` and `forward` cases run this file as the reference).

`forward_batch` is the same pass over several sequences at once: their tokens packed into one
[T, H] activation (sequence b owns rows seg[b]..seg[b+1]-1) under one step context, so every dense op
(norms, projections, router, head) reads its weights once per step for all of them and the MoE groups
all their tokens by expert; only attention runs per sequence, against its own cache and positions.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import LayerParams, ModelParams, OpTable
from .config import ModelConfig


def decoder_layer(ops: OpTable, cfg: ModelConfig, i: int, p: LayerParams, h, ctx, cache, batch=None):
    """Layer i on the residual stream h [T, H]; returns (h, the layer's cache after this step). For a
    batched step, `batch` is its `Batch` and `cache` the list of the sequences' layer caches."""
    T = h.shape[0]
    router_in = h                                             # the raw layer input, before any norm
    a = ops.rms_norm(h, p.attn_norm, cfg.rms_norm_eps)
    q, k, v = ops.qkv(a, p.wq, p.wk, p.wv)
    q = q.reshape(T, cfg.num_attention_heads, cfg.head_dim)
    k = k.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    # the router only needs router_in: picking experts here lets an offloading backend start
    # fetching them while attention runs
    expert_w, expert_ids = ops.route(router_in, p.router, cfg.moe_num_active_primary_experts,
                                     cfg.moe_primary_router_apply_softmax)
    if cfg.layer_uses_rope(i):                                # NoPE layers skip it for q and k
        q, k = ops.rope(q, k, ctx)
    if batch is None:
        attn, cache = ops.attention(q, k, v, cache, ctx, cfg.layer_window(i))
    else:                                                     # each sequence against its own cache
        attn, cache = ops.attention_batch(q, k, v, cache, batch.ctxs, batch.seg, cfg.layer_window(i))
    h = h + ops.linear(attn, p.wo)
    m = ops.rms_norm(h, p.ffn_norm, cfg.rms_norm_eps)
    return h + ops.moe(m, p.gate, p.up, p.down, expert_ids, expert_w), cache


def forward(ops: OpTable, cfg: ModelConfig, params: ModelParams, ids, positions, cache,
            last_only: bool = False):
    """Logits for `ids` at absolute `positions`, appending their keys and values to `cache`.

    ids, positions: int64 [T] numpy arrays. Returns backend logits [T or 1, vocab].
    """
    if ops.forward is not None:
        return ops.forward(cfg, params, ids, positions, cache, last_only)
    with ops.context(cfg, positions) as ctx:                 # what every layer of this step shares
        h = ops.embed(params.embed, ids)
        if ops.layers is not None:                            # a backend's run of every layer (memory budget)
            h = ops.layers(cfg, params.layers, h, ctx, cache)
        else:
            for i, p in enumerate(params.layers):
                if ops.layer is not None:                     # a backend's fused layer
                    h, cache.layers[i] = ops.layer(cfg, i, p, h, ctx, cache.layers[i])
                else:
                    h, cache.layers[i] = decoder_layer(ops, cfg, i, p, h, ctx, cache.layers[i])
        if last_only:
            h = h[-1:]
        h = ops.rms_norm(h, params.norm, cfg.rms_norm_eps)
        return ops.linear(h, params.head)


class Batch(NamedTuple):
    """The sequences of a batched step: row offsets (int64 [B+1]) and each one's step context."""
    seg: np.ndarray
    ctxs: list


def forward_batch(ops: OpTable, cfg: ModelConfig, params: ModelParams, ids, positions, caches, seg):
    """Logits of each sequence's last position after one step over several sequences.

    ids, positions: int64 [T] numpy arrays, sequence b's at rows seg[b]..seg[b+1]-1 (seg: int64 [B+1]);
    caches: B caches, each appended to. Returns backend logits [B, vocab]. A backend with a fused
    one-sequence `forward` but no `forward_batch` runs it once per sequence.
    """
    if ops.forward_batch is not None:
        return ops.forward_batch(cfg, params, ids, positions, caches, seg)
    if ops.forward is not None:
        return ops.concat([ops.forward(cfg, params, ids[a:b], positions[a:b], cache, True)
                           for cache, a, b in zip(caches, seg[:-1], seg[1:])])
    with ops.context(cfg, positions) as ctx:                 # the step: every sequence's rows
        batch = Batch(seg, [ops.context(cfg, positions[a:b]) for a, b in zip(seg[:-1], seg[1:])])
        h = ops.embed(params.embed, ids)
        for i, p in enumerate(params.layers):
            h, kept = decoder_layer(ops, cfg, i, p, h, ctx, [c.layers[i] for c in caches], batch)
            for c, layer_cache in zip(caches, kept):
                c.layers[i] = layer_cache
        h = h[seg[1:] - 1]                                    # each sequence's last row
        h = ops.rms_norm(h, params.norm, cfg.rms_norm_eps)
        return ops.linear(h, params.head)
