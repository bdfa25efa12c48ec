"""The torch ops: the op set of st_sdk.backend on torch tensors, same semantics as the NumPy reference.

Dtypes: weights are in the compute dtype (float32 or bfloat16) except norms and the router, which stay
float32 (a quantised router scrambles the top-k). The residual stream is float32 (`embed` and `moe`
return float32); `rms_norm`, `linear` and `attention` return the compute dtype. Softmax and RMSNorm
run in float32.

Host reads: none in `embed`, `rms_norm`, `linear`, `rope`, `attention`, `route`; the positions
arrive as host numpy, so cache bookkeeping is host-side. `moe` reads the picked expert ids back only
where the device is the host's memory (CPU: `tolist()` is a pointer read, no transfer) or to size
the per-expert groups of a prefill; on an accelerator the decode path gathers the picked experts'
weights on the device instead (`moe_gather`).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .cache import KVCache, LayerKV


def device_positions(positions, device) -> tuple[np.ndarray, torch.Tensor]:
    """(host int64 array, device int64 tensor) of the step's absolute positions."""
    if isinstance(positions, torch.Tensor):
        return positions.cpu().numpy(), positions.to(device)   # callers pass numpy; this is a fallback
    host = np.asarray(positions, dtype=np.int64)
    return host, torch.from_numpy(host).to(device)


def embed(table: torch.Tensor, ids) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(table.device)
    return table.index_select(0, ids).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(out_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight)


@functools.lru_cache(maxsize=8)
def _inv_freq(theta: float, head_dim: int, device: torch.device) -> torch.Tensor:
    """[hd]: the rotation frequencies, each twice (rotate-half layout), float64."""
    f = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    return torch.cat([f, f])


def rope_tables(positions_t: torch.Tensor, theta: float, head_dim: int, dtype: torch.dtype):
    """cos, sin [T, 1, hd] for the step: angles in float64 (position * inv_freq loses digits in
    float32 at long contexts), cast once to the compute dtype and shared by every layer."""
    angle = positions_t.to(torch.float64)[:, None] * _inv_freq(float(theta), head_dim, positions_t.device)
    return angle.cos().to(dtype)[:, None, :], angle.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope(x: torch.Tensor, positions, theta: float) -> torch.Tensor:
    _, pt = device_positions(positions, x.device)
    cos, sin = rope_tables(pt, theta, x.shape[-1], torch.float32)
    return apply_rope(x.float(), cos, sin).to(x.dtype)


def new_cache(config, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
    return KVCache(config, capacity, dtype, device)


def attention(q, k, v, cache: LayerKV, positions, window: int | None,
              positions_t: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention of q [T, nH, hd] over the cached keys plus k/v [T, nKV, hd] (appended to the cache),
    visible where key position <= query position (and > query - window). Returns [T, nH*hd]."""
    T, nH, hd = q.shape
    host, pt = device_positions(positions, q.device) if positions_t is None else (np.asarray(positions), positions_t)
    if k.dtype != cache.k.dtype:
        k, v = k.to(cache.k.dtype), v.to(cache.v.dtype)
    if window and T > 1:
        # a chunk may need ring slots it is about to overwrite: read the ring first, as the reference does
        n = cache.used
        keys = torch.cat([cache.k[:, :n], k.transpose(0, 1)], dim=1)
        vals = torch.cat([cache.v[:, :n], v.transpose(0, 1)], dim=1)
        kpos = torch.cat([cache.pos[:n], pt])
        cache.append(k, v, pt, host)
    else:
        cache.append(k, v, pt, host)
        n = cache.used
        keys, vals, kpos = cache.k[:, :n], cache.v[:, :n], cache.pos[:n]
    if T == 1 and (cache.dense or (not window and cache.monotone)):
        mask = None                                   # every cached key is visible to the query
    else:
        qp = pt[:, None]
        mask = (kpos[None, :] <= qp) & (kpos[None, :] >= 0)
        if window:
            mask &= kpos[None, :] > qp - window
    if T == 1 and q.device.type == "cpu":
        return decode_attention(q, keys, vals, mask)
    out = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(0, 1)[None], keys[None], vals[None],
                                         attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(T, nH * hd)


def decode_attention(q, keys, vals, mask) -> torch.Tensor:
    """One query on the CPU, in float32: the CPU flash-attention kernel is tuned for many queries
    (1.8 ms at 1024 cached keys against 0.2 ms here, measured), and ATen's batched bfloat16 matmul
    without oneDNN is slower than converting the keys. Query head h reads kv head h // group."""
    nH, hd = q.shape[1], q.shape[2]
    nKV = keys.shape[0]
    qg = q[0].float().view(nKV, nH // nKV, hd)
    scores = torch.bmm(qg, keys.float().transpose(1, 2)) * hd ** -0.5      # [nKV, group, n]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), vals.float())             # [nKV, group, hd]
    return out.to(keys.dtype).reshape(1, nH * hd)


def route(x: torch.Tensor, router: torch.Tensor, k: int, softmax: bool):
    logits = F.linear(x.float(), router)              # [T, E], float32 like the stored router
    top, idx = torch.topk(logits, k, dim=-1, sorted=True)
    w = torch.softmax(top, dim=-1) if softmax else torch.sigmoid(top)
    return w / w.sum(dim=-1, keepdim=True), idx


def route_one(x: torch.Tensor, router: torch.Tensor, k: int, softmax: bool):
    """`route` for one token [H]: the picked ids as Python ints (on the CPU a read of host memory)
    and their weights [k] as a tensor."""
    w, idx = route(x[None], router, k, softmax)
    return idx[0].tolist(), w[0]


def moe_one(x: torch.Tensor, gu, down, ids, weights, out: torch.Tensor) -> None:
    """Add the picked experts' weighted ReGLU outputs for one token x [H] into `out` (float32 [H], in
    place). `gu` and `down` are indexed by expert id: the stacked tensors or lists of per-expert
    views; `gu` gate and up stacked ([2F, H] each) or a (gate, up) pair ([F, H] each; weights used in
    place from the file). The picked weights are sliced in place, never copied. All k gate/up
    products land in one buffer and are activated together, then all k down products, summed by one
    float32 matrix-vector product: the small ops run once per layer, not once per expert."""
    k, (H, F_) = len(ids), down[ids[0]].shape
    gus = torch.empty((2, k, F_) if isinstance(gu, tuple) else (k, 2 * F_), dtype=x.dtype, device=x.device)
    for j, e in enumerate(ids):
        if isinstance(gu, tuple):
            torch.mv(gu[0][e], x, out=gus[0, j])
            torch.mv(gu[1][e], x, out=gus[1, j])
        else:
            torch.mv(gu[e], x, out=gus[j])
    gate, up = (gus[0], gus[1]) if isinstance(gu, tuple) else (gus[:, :F_], gus[:, F_:])
    act = gate.relu_().mul_(up)
    ys = torch.empty((k, H), dtype=x.dtype, device=x.device)
    for j, e in enumerate(ids):
        torch.mv(down[e], act[j], out=ys[j])
    out.addmv_(ys.t().float(), weights)


def expert_act(x: torch.Tensor, gu, e: int, F_: int) -> torch.Tensor:
    """relu(gate_e(x)) * up_e(x). `gu` is gate and up stacked as one [E, 2F, H] tensor (one GEMM,
    not two) or a (gate, up) pair of [E, F, H] tensors (weights used in place from the file)."""
    if isinstance(gu, tuple):
        return torch.relu(F.linear(x, gu[0][e])).mul_(F.linear(x, gu[1][e]))
    y = F.linear(x, gu[e])
    return y[..., :F_].relu_().mul_(y[..., F_:])


def moe_gather(x, gu, down, ids, weights) -> torch.Tensor:
    """One token: gather the k picked experts' weights on the device and run batched matmuls.
    No host read, so an accelerator never waits for the router."""
    e = ids[0]
    F_ = down.shape[2]
    xt = x.to(down.dtype)[0]
    if isinstance(gu, tuple):
        a = torch.relu(torch.matmul(gu[0].index_select(0, e), xt)) * torch.matmul(gu[1].index_select(0, e), xt)
    else:
        y = torch.matmul(gu.index_select(0, e), xt)                           # [k, 2F]
        a = torch.relu(y[:, :F_]) * y[:, F_:]
    out = torch.bmm(down.index_select(0, e), a[:, :, None])[..., 0]        # [k, H]
    return (weights[0, :, None] * out.float()).sum(0, keepdim=True)


def moe_loop(x, gu, down, ids, weights) -> torch.Tensor:
    """One token, weights in host memory: `moe_one` on the stacked tensors. Reading k ids from a CPU
    tensor is a pointer read, not a device round trip."""
    out = torch.zeros((1, x.shape[1]), dtype=torch.float32, device=x.device)
    moe_one(x[0].to(down.dtype), gu, down, ids[0].tolist(), weights[0], out[0])
    return out


def moe_grouped(x, gu, down, ids, weights) -> torch.Tensor:
    """Many tokens: sort the (token, slot) pairs by expert and run each expert that appears once on
    its group of tokens. The group sizes are read back once per call (they size the matmuls)."""
    T, k = ids.shape
    E, F_ = down.shape[0], down.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    tok = order // k
    xs = x.to(down.dtype).index_select(0, tok)
    ws = weights.reshape(-1).index_select(0, order)[:, None]
    ys = torch.empty((T * k, down.shape[1]), dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c:
            ys[start:start + c] = F.linear(expert_act(xs[start:start + c], gu, e, F_), down[e])
            start += c
    return torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device).index_add_(0, tok, ys * ws)


def moe(x, gu, down, ids, weights, gather: bool) -> torch.Tensor:
    """ReGLU experts of the picked ids, weighted; `gu` as in `expert_act`."""
    if x.shape[0] == 1:
        return (moe_gather if gather else moe_loop)(x, gu, down, ids, weights)
    return moe_grouped(x, gu, down, ids, weights)
