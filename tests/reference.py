"""An independent float64 SmallThinker forward pass, written from docs/model.md alone.

It shares no compute code with st_sdk (no graph, ops, cache or backend): it only reads fields of a
`ModelConfig` and weight arrays keyed by HF tensor names (experts one tensor each). Loops over
tokens, heads and experts keep it obviously right rather than fast; it is meant for the tiny test
configs. Import it from a test as `from reference import reference_logits` (tests/ is on sys.path
under pytest's default import mode).

`flaws` re-creates the usual parity mistakes on purpose, so a test can prove its configs are sensitive
to each of them. Leave it empty for the reference itself.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

#: deliberate mistakes `reference_logits(..., flaws=...)` can make (docs/model.md, the mistakes it invites)
FLAWS = (
    "router_on_normed_input",   # router reads rmsnorm(h) instead of the raw layer input
    "silu_experts",             # silu(gate) * up instead of relu(gate) * up
    "interleaved_rope",         # rotate pairs (0,1), (2,3)... instead of NeoX rotate-half
    "swa_off_by_one",           # sees keys j >= t - window (window + 1 keys)
    "rope_on_nope_layers",      # ignores rope_layout: RoPE on every layer
    "softmax_router",           # softmax over the top-k whatever the config says
    "sigmoid_router",           # sigmoid-renormalise whatever the config says
    "swapped_head",             # tied <-> untied head
)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x) + eps))


def _rope(x: np.ndarray, pos: int, theta: float, interleaved: bool = False) -> np.ndarray:
    """Rotate one head vector x[hd] to absolute position `pos` (NeoX rotate-half)."""
    hd = x.shape[0]
    half = hd // 2
    inv_freq = np.array([theta ** (-2.0 * j / hd) for j in range(half)])
    angle = pos * inv_freq
    if interleaved:   # the wrong (GPT-J) pairing, for flaw tests only
        out = x.copy()
        for j in range(half):
            a, b = x[2 * j], x[2 * j + 1]
            out[2 * j] = a * np.cos(angle[j]) - b * np.sin(angle[j])
            out[2 * j + 1] = b * np.cos(angle[j]) + a * np.sin(angle[j])
        return out
    cos = np.cos(np.concatenate([angle, angle]))
    sin = np.sin(np.concatenate([angle, angle]))
    rotate_half = np.concatenate([-x[half:], x[:half]])
    return x * cos + rotate_half * sin


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_logits(cfg, weights: Mapping[str, np.ndarray], ids: Iterable[int],
                     flaws: Iterable[str] = ()) -> np.ndarray:
    """float64 logits [T, V] of a fresh sequence `ids` at positions 0..T-1."""
    flaws = set(flaws)
    unknown = flaws - set(FLAWS)
    if unknown:
        raise ValueError(f"unknown flaw(s) {sorted(unknown)}; known: {FLAWS}")

    def W(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float64)

    ids = [int(t) for t in ids]
    T = len(ids)
    nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = nH // nKV
    eps = cfg.rms_norm_eps
    k = cfg.moe_num_active_primary_experts
    softmax_router = bool(cfg.moe_primary_router_apply_softmax)
    if "softmax_router" in flaws:
        softmax_router = True
    if "sigmoid_router" in flaws:
        softmax_router = False

    h = W("model.embed_tokens.weight")[ids]                        # [T, H], no scaling
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        router_in = h.copy()                                      # the raw layer input
        a = np.stack([_rmsnorm(h[t], W(p + "input_layernorm.weight"), eps) for t in range(T)])
        q = (a @ W(p + "self_attn.q_proj.weight").T).reshape(T, nH, hd)
        kk = (a @ W(p + "self_attn.k_proj.weight").T).reshape(T, nKV, hd)
        v = (a @ W(p + "self_attn.v_proj.weight").T).reshape(T, nKV, hd)
        if cfg.rope_layout[i] or "rope_on_nope_layers" in flaws:
            inter = "interleaved_rope" in flaws
            q = np.stack([[_rope(q[t, j], t, cfg.rope_theta, inter) for j in range(nH)] for t in range(T)])
            kk = np.stack([[_rope(kk[t, j], t, cfg.rope_theta, inter) for j in range(nKV)] for t in range(T)])
        window = cfg.sliding_window_size if cfg.sliding_window_layout[i] else None

        attn = np.zeros((T, nH * hd))
        for t in range(T):
            first = 0
            if window is not None:
                first = max(0, t - window + (0 if "swa_off_by_one" in flaws else 1))   # j > t - window
            for head in range(nH):
                g = head // group                                 # GQA: kv head h // (nH / nKV)
                keys = kk[first:t + 1, g]                         # [S, hd]
                vals = v[first:t + 1, g]
                scores = keys @ q[t, head] / np.sqrt(hd)
                attn[t, head * hd:(head + 1) * hd] = _softmax(scores) @ vals
        h = h + attn @ W(p + "self_attn.o_proj.weight").T

        m = np.stack([_rmsnorm(h[t], W(p + "post_attention_layernorm.weight"), eps) for t in range(T)])
        rin = router_in
        if "router_on_normed_input" in flaws:
            rin = np.stack([_rmsnorm(router_in[t], W(p + "input_layernorm.weight"), eps) for t in range(T)])
        router_logits = rin @ W(p + "block_sparse_moe.primary_router.weight").T   # [T, E]
        moe_out = np.zeros_like(h)
        for t in range(T):
            picked = np.argsort(-router_logits[t], kind="stable")[:k]
            top = router_logits[t, picked]
            w = _softmax(top) if softmax_router else _sigmoid(top) / _sigmoid(top).sum()
            for wj, e in zip(w, picked):
                q_ = p + f"block_sparse_moe.experts.{int(e)}."
                gate = W(q_ + "gate.weight") @ m[t]
                up = W(q_ + "up.weight") @ m[t]
                act = gate / (1.0 + np.exp(-gate)) if "silu_experts" in flaws else np.maximum(gate, 0.0)
                moe_out[t] += wj * (W(q_ + "down.weight") @ (up * act))
        h = h + moe_out

    h = np.stack([_rmsnorm(h[t], W("model.norm.weight"), eps) for t in range(T)])
    tied = bool(cfg.tie_word_embeddings) != ("swapped_head" in flaws)
    head = W("model.embed_tokens.weight") if tied else W("lm_head.weight")
    return h @ head.T


# ---- helpers: any ModelParams (loaded or synthetic) -> HF-named float arrays, and back ----------

def hf_weights_from_params(params) -> dict[str, np.ndarray]:
    """Dequantised float64 arrays keyed by HF names from an `st_sdk.backend.ModelParams`, experts split
    per expert via `.expert(e)`. The head is included when it is a separate tensor."""
    out = {"model.embed_tokens.weight": params.embed.raw.numpy().astype(np.float64),
           "model.norm.weight": params.norm.raw.numpy().astype(np.float64)}
    if params.head is not params.embed:
        out["lm_head.weight"] = params.head.raw.numpy().astype(np.float64)
    names = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "ffn_norm": "post_attention_layernorm.weight", "router": "block_sparse_moe.primary_router.weight"}
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        for field, hf in names.items():
            out[p + hf] = getattr(lp, field).raw.numpy().astype(np.float64)
        for part in ("gate", "up", "down"):
            stacked = getattr(lp, part).raw
            for e in range(stacked.shape[0]):
                out[p + f"block_sparse_moe.experts.{e}.{part}.weight"] = stacked.expert(e).numpy().astype(np.float64)
    return out


def reference_for_model(model, ids) -> np.ndarray:
    """The reference logits of an `st_sdk` Model's own (dequantised) weights."""
    return reference_logits(model.config, hf_weights_from_params(model.params), ids)


def random_hf_weights(cfg, seed: int = 0, embed_std: float = 2.0) -> dict[str, np.ndarray]:
    """float32 weights scaled so every part of the model matters: matrices ~ N(0, 1/fan_in), so
    activations, attention scores, router logits and output logits are O(1); norm weights spread
    over [0.5, 2] and embeddings larger than 1 so normed and raw streams clearly differ."""
    from st_sdk.weights.layout import hf_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        if len(shape) == 1:
            x = rng.uniform(0.5, 2.0, shape)
        elif name == "model.embed_tokens.weight":
            x = embed_std * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = x.astype(np.float32)
    return out


def params_from_hf(cfg, weights: Mapping[str, np.ndarray], fmt: str = "f32"):
    """ModelParams over `weights` stored as `fmt` (matrices only; norms and the router stay f32,
    as st_sdk.synth does), assembled by st_sdk's own HF layout."""
    from st_sdk.weights.layout import assemble
    from st_sdk.weights.tensor import WeightTensor, quantize

    tensors = {}
    for name, x in weights.items():
        x = np.asarray(x, np.float32)
        f = fmt if x.ndim == 2 and not name.endswith("primary_router.weight") else "f32"
        if f in ("q8_0", "q4_0") and x.shape[-1] % 32:
            f = "f32"
        tensors[name] = WeightTensor(name, f, x.shape, quantize(f, x), "<test>")
    return assemble(cfg, tensors.__getitem__, "hf")
