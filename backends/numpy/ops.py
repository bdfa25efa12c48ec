"""The NumPy reference ops: float32 compute, written for clarity. Weights are dequantised per use."""
from __future__ import annotations

import numpy as np

from st_sdk.backend import Param
from st_sdk.weights.tensor import dequantize

from .cache import KVCache, LayerKV


def embed(table: Param, ids: np.ndarray) -> np.ndarray:
    t = table.raw
    return dequantize(t.fmt, t.data[ids], (len(ids), t.shape[1]))


def rms_norm(x: np.ndarray, weight: Param, eps: float) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return weight.raw.numpy() * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def linear(x: np.ndarray, weight: Param) -> np.ndarray:
    return x @ weight.raw.numpy().T


def rotate(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [T, n, hd] rotated to `positions`: NeoX rotate-half over all hd dims, angles in float64."""
    hd = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angle = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    angle = np.concatenate([angle, angle], axis=-1)
    cos = np.cos(angle).astype(np.float32)[:, None, :]
    sin = np.sin(angle).astype(np.float32)[:, None, :]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    return x * cos + rotated * sin


def rope(q: np.ndarray, k: np.ndarray, ctx) -> tuple[np.ndarray, np.ndarray]:
    return rotate(q, ctx.positions, ctx.theta), rotate(k, ctx.positions, ctx.theta)


def new_cache(config, capacity: int) -> KVCache:
    return KVCache(config, capacity)


def attention(q, k, v, cache: LayerKV, ctx, window: int | None) -> tuple[np.ndarray, LayerKV]:
    """Causal GQA attention over the cached keys plus k/v (appended to the cache), in float32; keys
    visible when their position is <= the query's and, with a window, > the query's - window."""
    positions = ctx.positions
    T, nH, hd = q.shape
    nKV = k.shape[1]
    cache.spec.check(nKV, hd, window)
    ck, cv, cpos = cache.entries()
    keys = np.concatenate([ck.astype(np.float32, copy=False), k]) if len(ck) else k
    vals = np.concatenate([cv.astype(np.float32, copy=False), v]) if len(cv) else v
    kpos = np.concatenate([cpos, positions]) if len(cpos) else np.asarray(positions)
    cache.append(k, v, np.asarray(positions, np.int64))
    qpos = np.asarray(positions)[:, None]
    visible = kpos[None, :] <= qpos
    if window:
        visible &= kpos[None, :] > qpos - window
    group = nH // nKV
    keys = np.repeat(keys, group, axis=1)             # query head h reads kv head h // group
    vals = np.repeat(vals, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, keys) / np.sqrt(hd)
    scores = np.where(visible[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hts,shd->thd", p, vals)
    return out.reshape(T, nH * hd).astype(np.float32), cache


def route(x: np.ndarray, weight: Param, k: int, softmax: bool):
    logits = x @ weight.raw.numpy().T                 # [T, E]
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, idx, axis=-1)
    if softmax:
        w = np.exp(top - top.max(axis=-1, keepdims=True))
    else:
        w = 1.0 / (1.0 + np.exp(-top))
    w = w / w.sum(axis=-1, keepdims=True)
    return w.astype(np.float32), idx.astype(np.int64)


def moe(x, gate: Param, up: Param, down: Param, ids, weights) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float32)
    for e in np.unique(ids):
        rows, slot = np.nonzero(ids == e)
        xe = x[rows]
        g = xe @ gate.raw.expert(int(e)).numpy().T
        u = xe @ up.raw.expert(int(e)).numpy().T
        y = (u * np.maximum(g, 0.0)) @ down.raw.expert(int(e)).numpy().T
        np.add.at(out, rows, weights[rows, slot][:, None] * y)
    return out
