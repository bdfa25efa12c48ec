"""The SmallThinker forward pass, written once against the bound op table.

Reads top to bottom like the forward in SMALLTHINKER.md. Every op is a plain callable of the chosen
backend (or the NumPy reference fallback); nothing here depends on a backend's array type except
slicing the last row.
"""
from __future__ import annotations

from .backend import LayerParams, ModelParams, OpTable
from .config import ModelConfig


def decoder_layer(ops: OpTable, cfg: ModelConfig, i: int, p: LayerParams, h, positions, cache):
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
    attn = ops.attention(q, k, v, cache, positions, cfg.layer_window(i))
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
