"""`st-sdk info MODEL`: what a model file holds and what running it costs, without loading a backend."""
from __future__ import annotations

import json

from st_sdk.sizes import fmt_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model file (layout, sizes, types, memory)")
    p.add_argument("model", metavar="MODEL", help="HF directory or .gguf file")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="also show the memory plan for this budget ('8GiB'): what stays resident, how many experts "
                        "the cache holds, and the smallest budget the model runs in; nothing is loaded")
    p.add_argument("--context", type=int, default=None,
                   help="with --max-memory: tokens the KV cache is planned for (default: what load plans)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def active_parameters(cfg) -> int:
    """Parameters one token touches: attention, router, k experts, norms and the LM head
    (the embedding is a row lookup)."""
    H = cfg.hidden_size
    attn = H * cfg.q_dim * 2 + H * cfg.kv_dim * 2
    experts = cfg.moe_num_active_primary_experts * 3 * cfg.moe_ffn_hidden_size * H
    per_layer = attn + 2 * H + cfg.moe_num_primary_experts * H + experts
    return cfg.num_hidden_layers * per_layer + H + cfg.vocab_size * H


GROUPS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention", "router": "router",
          "gate": "experts", "up": "experts", "down": "experts", "attn_norm": "norms", "ffn_norm": "norms"}


def plan(mf, params, max_memory, context: int | None) -> dict:
    """The memory plan st_sdk.load(..., max_memory=) starts from (st_sdk.offload.experts.memory_plan_for)."""
    from st_sdk.context import resolve_context
    from st_sdk.offload.experts import memory_plan_for

    cfg = mf.config
    context = resolve_context(cfg, context, budget=True)
    p = memory_plan_for(cfg, params, max_memory, context=context)
    return {"budget_bytes": p.budget, "context": context, "kv_dtype": "f16", "dense_bytes": p.dense_bytes,
            "kv_bytes": p.kv_bytes, "scratch_bytes": p.scratch_bytes, "activation_bytes": p.activation_bytes,
            "expert_bytes": p.expert_bytes,
            "slots": p.slots, "experts": p.n_experts, "cache_bytes": p.cache_bytes,
            "minimum_budget_bytes": p.budget_for(p.minimum_slots),
            "all_experts_budget_bytes": p.budget_for(p.n_experts)}


def describe(path, max_memory=None, context: int | None = None) -> dict:
    from collections import Counter, defaultdict

    from st_sdk.weights import open_model

    mf = open_model(path)
    cfg = mf.config
    params = mf.params()
    types: dict[str, Counter] = defaultdict(Counter)
    weight_bytes = 0
    for name, p in params.all():
        group = {"embed": "embedding", "norm": "norms", "head": "lm_head"}.get(name) or GROUPS[name.split(".")[-1]]
        types[group][p.raw.fmt] += 1
        weight_bytes += p.raw.nbytes
    layers = []
    for i in range(cfg.num_hidden_layers):
        w = cfg.layer_window(i)
        layers.append(("RoPE" if cfg.layer_uses_rope(i) else "NoPE") + (f"+SWA{w}" if w else "+global"))
    stored: dict[str, list[int]] = defaultdict(lambda: [0, 0])   # type -> [tensors, bytes] over the file
    for name in mf.names:
        t = mf.get(name)
        stored[t.fmt][0] += 1
        stored[t.fmt][1] += t.nbytes
    tok = mf.tokenizer
    extra = {"memory_plan": plan(mf, params, max_memory, context)} if max_memory is not None else {}
    return extra | {
        "path": str(mf.path), "format": mf.kind, "architecture": "SmallThinkerForCausalLM",
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv x {cfg.head_dim}",
        "experts": f"{cfg.moe_num_active_primary_experts} of {cfg.moe_num_primary_experts} x {cfg.moe_ffn_hidden_size}",
        "router": "softmax" if cfg.moe_primary_router_apply_softmax else "sigmoid",
        "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
        "layer_layout": layers,
        "parameters": cfg.parameter_count(), "active_parameters": active_parameters(cfg),
        "weight_types": {g: dict(c) for g, c in types.items()},
        "file_type": mf.file_type,
        "tensor_types": {f: {"tensors": n, "bytes": b} for f, (n, b) in
                         sorted(stored.items(), key=lambda kv: -kv[1][1])},
        "file_bytes": mf.file_size, "weight_bytes": weight_bytes,
        # per storage type (load(kv_dtype=)): f16 is the default of the c, torch and jax backends
        "kv_cache_bytes_per_1k_tokens": {t: cfg.kv_cache_bytes(1024, t) for t in ("f16", "q8_0", "f32")},
        "memory_bytes_at_1k_tokens": weight_bytes + cfg.kv_cache_bytes(1024, "f16"),
        "tokenizer": tok is not None, "chat_template": bool(tok is not None and tok.chat_template),
        "eos_ids": list(tok.eos_ids) if tok is not None else list(cfg.eos_token_id),
    }


def _compact(layers: list[str]) -> str:
    """'NoPE+global, RoPE+SWA4096 x3' repeated patterns shown once with a count."""
    for period in range(1, len(layers) + 1):
        if len(layers) % period == 0 and layers == layers[:period] * (len(layers) // period):
            return f"[{', '.join(layers[:period])}] x {len(layers) // period}"
    return ", ".join(layers)


def run(args) -> int:
    if args.context is not None and args.max_memory is None:
        from st_sdk.errors import InputError

        raise InputError("--context goes with --max-memory (it sizes the planned KV cache)")
    d = describe(args.model, args.max_memory, args.context)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    rows = [
        ("model", f"{d['path']} ({d['format']})"), ("architecture", d["architecture"]),
        ("layers", f"{d['layers']}: {_compact(d['layer_layout'])}"), ("hidden", d["hidden_size"]),
        ("attention", d["heads"]), ("experts", f"{d['experts']} ({d['router']} router)"),
        ("vocab / context", f"{d['vocab_size']} / {d['context_length']}"),
        ("tied embeddings", d["tied_embeddings"]),
        ("parameters", f"{d['parameters']:,} total, {d['active_parameters']:,} active per token"),
        ("weight types", "; ".join(f"{g} {', '.join(f'{k} x{v}' for k, v in c.items())}"
                                   for g, c in d["weight_types"].items())),
        ("tensor types", ", ".join(f"{f} {v['tensors']} tensors {fmt_bytes(v['bytes'])}"
                                   for f, v in d["tensor_types"].items())
         + (f" (file type {d['file_type']})" if d["file_type"] else "")),
        ("file size", fmt_bytes(d["file_bytes"])), ("weights", fmt_bytes(d["weight_bytes"])),
        ("KV cache per 1k tokens", ", ".join(f"{fmt_bytes(b)} ({t})" for t, b in d["kv_cache_bytes_per_1k_tokens"].items())),
        ("memory @1k tokens", fmt_bytes(d["memory_bytes_at_1k_tokens"]) + " (f16 KV cache)"),
        ("tokenizer", "yes" if d["tokenizer"] else "no"),
        ("chat template", "yes" if d["chat_template"] else "no"), ("eos ids", d["eos_ids"]),
    ]
    if "memory_plan" in d:
        p = d["memory_plan"]
        rows.append(("memory plan", f"budget {fmt_bytes(p['budget_bytes'])}: dense {fmt_bytes(p['dense_bytes'])}, "
                     f"KV cache {fmt_bytes(p['kv_bytes'])} ({p['context']} tokens, {p['kv_dtype']}), scratch "
                     f"{fmt_bytes(p['scratch_bytes'])}, expert cache {p['slots']} x {fmt_bytes(p['expert_bytes'])} = "
                     f"{fmt_bytes(p['cache_bytes'])} ({p['slots'] / p['experts']:.0%} of {p['experts']} experts)"))
        rows.append(("budget range", f"runs from {fmt_bytes(p['minimum_budget_bytes'])}; every expert cached from "
                     f"{fmt_bytes(p['all_experts_budget_bytes'])} (experts as stored, and a process of this one's "
                     f"size, {fmt_bytes(p['activation_bytes'])} reserved for a step's activations: a backend's own "
                     f"layout, weight copies or activations, or a larger process, refit the slots at load)"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0
