"""The SmallThinker forward pass, written once against the bound op table.

Reads top to bottom like the forward in SMALLTHINKER.md. Every op is a plain callable of the chosen
backend (or the NumPy reference fallback); nothing here depends on a backend's array type except
slicing and picking rows.

`forward_batch` is the same pass over several sequences at once: their tokens packed into one
[T, H] activation (sequence b owns rows seg[b]..seg[b+1]-1), so every dense op (norms, projections,
router, head) reads its weights once per step for all of them and the MoE groups all their tokens by
expert; only attention runs per sequence, against its own cache and positions.
"""
from __future__ import annotations

from .backend import LayerParams, ModelParams, OpTable
from .config import ModelConfig


def decoder_layer(ops: OpTable, cfg: ModelConfig, i: int, p: LayerParams, h, positions, cache, seg=None):
    """One layer on h [T, H]. seg: None for one sequence (cache: its layer cache), else the batch's row
    offsets (cache: one layer cache per sequence)."""
    T = h.shape[0]
    router_in = h                                             # the raw layer input, before any norm
    a = ops.rms_norm(h, p.attn_norm, cfg.rms_norm_eps)
    q = ops.linear(a, p.wq).reshape(T, cfg.num_attention_heads, cfg.head_dim)
    k = ops.linear(a, p.wk).reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    v = ops.linear(a, p.wv).reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    # the router only needs router_in: picking experts here lets an offloading backend start
    # fetching them while attention runs
    expert_w, expert_ids = ops.route(router_in, p.router, cfg.moe_num_active_primary_experts,
                                     cfg.moe_primary_router_apply_softmax)
    if cfg.layer_uses_rope(i):                                # NoPE layers skip it for q and k
        q = ops.rope(q, positions, cfg.rope_theta)
        k = ops.rope(k, positions, cfg.rope_theta)
    if seg is None:
        attn = ops.attention(q, k, v, cache, positions, cfg.layer_window(i))
    else:
        attn = ops.attention_batch(q, k, v, cache, positions, seg, cfg.layer_window(i))
    h = h + ops.linear(attn, p.wo)
    m = ops.rms_norm(h, p.ffn_norm, cfg.rms_norm_eps)
    return h + ops.moe(m, p.gate, p.up, p.down, expert_ids, expert_w)


def forward(ops: OpTable, cfg: ModelConfig, params: ModelParams, ids, positions, cache,
            last_only: bool = False):
    """Logits for `ids` at absolute `positions`, appending their keys and values to `cache`.

    ids, positions: int64 [T] numpy arrays. Returns backend logits [T or 1, vocab].
    """
    if ops.forward is not None:
        return ops.forward(cfg, params, ids, positions, cache, last_only)
    h = ops.embed(params.embed, ids)
    for i, layer in enumerate(params.layers):
        if ops.layer is not None:
            h = ops.layer(cfg, i, layer, h, positions, cache.layers[i])
        else:
            h = decoder_layer(ops, cfg, i, layer, h, positions, cache.layers[i])
    if last_only:
        h = h[-1:]
    h = ops.rms_norm(h, params.norm, cfg.rms_norm_eps)
    return ops.linear(h, params.head)


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
    h = ops.embed(params.embed, ids)
    for i, layer in enumerate(params.layers):
        h = decoder_layer(ops, cfg, i, layer, h, positions, [c.layers[i] for c in caches], seg)
    h = h[seg[1:] - 1]                                        # each sequence's last row
    h = ops.rms_norm(h, params.norm, cfg.rms_norm_eps)
    return ops.linear(h, params.head)
