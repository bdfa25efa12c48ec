"""The torch ops: the op set of st_sdk.backend on torch tensors, same semantics as the NumPy reference.

Dtypes: weights are in the compute dtype (float32 or bfloat16) except norms and the router, which stay
float32 (a quantised router scrambles the top-k). The residual stream is float32 (`embed` and `moe`
return float32); `rms_norm`, `linear` and `attention` return the compute dtype. Softmax and RMSNorm
run in float32.

One token on the CPU is a step of its own (docs/torch_backend.md): products of one row are 1-D
matrix-vector products (`torch.mv`, ATen's gemv) with oneDNN off for the step (`TorchContext`),
decode attention runs in float32 by two batched products, and the MoE slices the k picked experts
in place and runs the small ops once per layer, not once per expert (`moe_one`).

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

from st_sdk.backend import StepContext

from .cache import KVCache, LayerKV


def device_positions(positions, device) -> tuple[np.ndarray, torch.Tensor]:
    """(host int64 array, device int64 tensor) of the step's absolute positions."""
    if isinstance(positions, torch.Tensor):
        return positions.cpu().numpy(), positions.to(device)   # callers pass numpy; this is a fallback
    host = np.asarray(positions, dtype=np.int64)
    return host, torch.from_numpy(host).to(device)


class TorchContext(StepContext):
    """A step on torch: its positions on the host and on the device, and RoPE tables made once per
    step (per dtype) for every layer. A one-token step on the CPU runs with oneDNN off: its bf16
    matrix-vector product reads weights at about half the speed of ATen's own kernel. The step runs
    without autograd (not inference_mode: a cache grown here must stay writable outside it)."""

    __slots__ = ("device_positions", "_tables", "_onednn", "_decode", "_grad")

    def __init__(self, positions, theta: float, device: torch.device, onednn: bool):
        host, self.device_positions = device_positions(positions, device)
        super().__init__(host, float(theta))
        self._tables: dict = {}
        self._onednn = onednn          # the setting seen at setup: concurrent steps cannot leave it off
        self._decode = device.type == "cpu" and len(host) == 1

    def tables(self, head_dim: int, dtype: torch.dtype):
        key = (head_dim, dtype)
        if key not in self._tables:
            self._tables[key] = rope_tables(self.device_positions, self.theta, head_dim, dtype)
        return self._tables[key]

    def __enter__(self) -> "TorchContext":
        self._grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        if self._decode:
            torch.backends.mkldnn.enabled = False
        return self

    def __exit__(self, *exc) -> None:
        if self._decode:
            torch.backends.mkldnn.enabled = self._onednn
        torch.set_grad_enabled(self._grad)


def embed(table: torch.Tensor, ids) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(table.device)
    return table.index_select(0, ids).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(out_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1 and weight.device.type == "cpu":      # one row: ATen's matrix-vector kernel
        return torch.mv(weight, x[0].to(weight.dtype))[None]
    return F.linear(x.to(weight.dtype), weight)


def qkv(x: torch.Tensor, wq, wk, wv, stacked: torch.Tensor | None):
    """q, k, v [T, n]: one product with the stacked [nq + 2 nkv, H] matrix when there is one."""
    if stacked is None:
        return linear(x, wq), linear(x, wk), linear(x, wv)
    y = linear(x, stacked)
    nq, nk = wq.shape[0], wk.shape[0]
    return y[:, :nq], y[:, nq:nq + nk], y[:, nq + nk:]


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


def rope(q: torch.Tensor, k: torch.Tensor, ctx: TorchContext):
    """q [T, nH, hd] and k [T, nKV, hd] rotated by the step's tables in their dtype. When k follows q
    in one buffer (the rows of the q/k/v product), both rotate as one tensor: half the small ops."""
    T, nq, hd = q.shape
    cos, sin = ctx.tables(hd, q.dtype)
    if k.dtype == q.dtype and q.stride()[1:] == k.stride()[1:] == (hd, 1) and (T == 1 or k.stride(0) == q.stride(0)) \
            and k.data_ptr() == q.data_ptr() + nq * hd * q.element_size() \
            and k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr():
        qk = apply_rope(q.as_strided((T, nq + k.shape[1], hd), q.stride()), cos, sin)
        return qk[:, :nq], qk[:, nq:]
    return apply_rope(q, cos, sin), apply_rope(k.to(q.dtype), cos, sin).to(k.dtype)


def new_cache(config, capacity: int, dtype: str, device: torch.device) -> KVCache:
    return KVCache(config, capacity, dtype, device)


def attention(q, k, v, cache: LayerKV, ctx: TorchContext, window: int | None):
    """GQA attention of q [T, nH, hd] over the cached keys plus k/v [T, nKV, hd] (appended to the cache),
    visible where key position <= query position (and > query - window). Returns ([T, nH*hd], cache)."""
    T, nH, hd = q.shape
    cache.spec.check(k.shape[1], hd, window)
    host, pt = ctx.positions, ctx.device_positions
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
        return decode_attention(q, keys, vals, mask), cache
    out = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(0, 1)[None], keys[None], vals[None],
                                         attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(T, nH * hd), cache


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


def moe_one(x: torch.Tensor, gu, down, ids, weights) -> torch.Tensor:
    """The picked experts' weighted ReGLU outputs for one token x [H], float32 [H]. `gu` and `down`
    are indexed by expert id: the stacked tensors or lists of per-expert views; `gu` gate and up
    stacked ([2F, H] each) or a (gate, up) pair ([F, H] each; weights used in place from the file).
    The picked weights are sliced in place, never copied. All k gate/up products land in one buffer
    and are activated together, then all k down products, summed by one float32 matrix-vector
    product: the small ops run once per layer, not once per expert."""
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
    return torch.mv(ys.t().float(), weights)


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


def moe(x, gu, down, ids, weights, gather: bool, experts=None) -> torch.Tensor:
    """ReGLU experts of the picked ids, weighted; `gu` as in `expert_act`. One token: gathered on
    the device (`gather`), or sliced in place (`moe_one`, through the per-expert views `experts`
    when given; reading k ids from a CPU tensor is a pointer read, not a device round trip)."""
    if x.shape[0] == 1:
        if gather:
            return moe_gather(x, gu, down, ids, weights)
        return moe_one(x[0].to(down.dtype), *(experts or (gu, down)), ids[0].tolist(), weights[0])[None]
    return moe_grouped(x, gu, down, ids, weights)
