"""The torch backend's decode against a straightforward eager PyTorch loop on the same weights.

The loop is written the way a model's reference code is: RMSNorm, separate q/k/v/o `F.linear`s,
rotate-half RoPE, `scaled_dot_product_attention` over a concatenated cache, a sigmoid/softmax top-k
router and one expert at a time (`F.linear` gate, up, down), in bfloat16 with torch's default
settings. Both run in one process on the same tensors (the backend's converted weights), token by
token interleaved, so the machine's noise hits both alike; the ratio is the median of per-token
ratios. Logits are compared too, so the two are known to compute the same model.

    python benchmarks/torch_eager_baseline.py MODEL.gguf [--tokens 32] [--prompt-len 128] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def eager_step(model, token: int, pos: int, kv: list):
    """One decode step of the reference-style loop; kv: per-layer [keys, values] lists, grown by cat."""
    import torch
    import torch.nn.functional as F

    cfg, P = model.config, model.params
    nH, nKV, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    dt = P.layers[0].wq.value.dtype

    def norm(x, w):
        return F.rms_norm(x, w.shape, w, eps).to(dt)

    def rope(x):
        inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.cat([pos * inv, pos * inv])
        return x * ang.cos().to(dt) + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * ang.sin().to(dt)

    h = P.embed.value[token][None].float()
    for i, p in enumerate(P.layers):
        logits = F.linear(h, p.router.value)
        top, ids = torch.topk(logits, cfg.moe_num_active_primary_experts)
        w = torch.softmax(top, -1) if cfg.moe_primary_router_apply_softmax else torch.sigmoid(top)
        w = w / w.sum(-1, keepdim=True)
        x = norm(h, p.attn_norm.value)
        q = F.linear(x, p.wq.value).view(1, nH, hd)
        k = F.linear(x, p.wk.value).view(1, nKV, hd)
        v = F.linear(x, p.wv.value).view(1, nKV, hd)
        if cfg.layer_uses_rope(i):
            q, k = rope(q), rope(k)
        kv[i][0] = torch.cat([kv[i][0], k.transpose(0, 1)], 1)
        kv[i][1] = torch.cat([kv[i][1], v.transpose(0, 1)], 1)
        keys, vals = kv[i]
        if cfg.layer_window(i):
            keys, vals = keys[:, -cfg.layer_window(i):], vals[:, -cfg.layer_window(i):]
        a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], vals[None], enable_gqa=True)
        h = h + F.linear(a[0].transpose(0, 1).reshape(1, nH * hd), p.wo.value)
        m = norm(h, p.ffn_norm.value)
        out = torch.zeros_like(h)
        for j, e in enumerate(ids[0].tolist()):
            act = torch.relu(F.linear(m, p.gate.value[e])) * F.linear(m, p.up.value[e])
            out = out + w[0, j] * F.linear(act, p.down.value[e])
        h = h + out
    return F.linear(norm(h, P.norm.value), P.head.value)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .gguf file or HF directory")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed (default 32)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decoding (default 128)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import st_sdk

    model = st_sdk.load(args.model, backend="torch", n_threads=args.threads)
    import torch

    from st_sdk.timing import prompt_ids

    cfg = model.config
    prompt = prompt_ids(model, args.prompt_len)
    session = model.session()
    session.feed(prompt)
    with torch.no_grad():
        kv = [[layer.k[:, :len(prompt)].clone(), layer.v[:, :len(prompt)].clone()] for layer in session.cache.layers]
        tok, ours, eager, diffs, same = int(prompt[-1]), [], [], [], []
        for step in range(args.tokens + 2):                 # the first two steps warm up
            pos = len(prompt) + step
            t = time.perf_counter()
            a = session.feed([tok])
            t1 = time.perf_counter()
            b = eager_step(model, tok, pos, kv).float().numpy()
            t2 = time.perf_counter()
            if step >= 2:
                ours.append(t1 - t)
                eager.append(t2 - t1)
            diffs.append(float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
            same.append(int(np.argmax(a)) == int(np.argmax(b)))
            tok = int(np.argmax(a))
    med = statistics.median
    print(f"model {args.model}: {cfg.num_hidden_layers} layers, {args.threads} threads, "
          f"prompt {len(prompt)}, {args.tokens} tokens")
    print(f"torch backend  {1 / med(ours):7.2f} tok/s")
    print(f"eager loop     {1 / med(eager):7.2f} tok/s")
    print(f"backend / eager: {med([e / o for o, e in zip(ours, eager)]):.2f}x (median of per-token ratios); "
          f"max |logit diff| / max |logit|: {max(diffs):.2e}, median {med(diffs):.2e}; "
          f"same top-1 token on {np.mean(same):.0%} of steps")


if __name__ == "__main__":
    main()
