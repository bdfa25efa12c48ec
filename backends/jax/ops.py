"""The JAX ops: pure functions of jnp arrays. The compiled step (backend.py) traces the graph
(st_sdk/graph.py) over them once per shape bucket; the op-level API jits them one by one.
Activations are float32; weights are float32 or bfloat16 (`Packed` on CPU). Semantics are the NumPy
reference's (backends/numpy/ops.py)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from st_sdk.backend import StepContext

F32 = jnp.float32


class JaxContext(StepContext):
    """A step on jax: its positions (host NumPy, or traced inside the compiled step), the same
    positions as a device array, which of the step's rows are real (a padded chunk's are not), and
    the RoPE tables cos/sin [T, hd/2] of those positions."""

    __slots__ = ("device_positions", "valid", "cos", "sin")

    def __init__(self, positions, theta: float, device_positions, valid, cos, sin):
        super().__init__(positions, theta)
        self.device_positions, self.valid, self.cos, self.sin = device_positions, valid, cos, sin


@jax.tree_util.register_pytree_node_class
class Packed:
    """A weight [..., N, K] stored as row chunks [..., nb, rows, K] (N padded up to nb * rows).

    XLA's CPU dot has no fast bfloat16 path, and converting a whole matrix to float32 first streams a
    float32 copy through memory; a scan over chunks converts one cache-sized piece at a time, so
    memory traffic stays at the stored 2 bytes per weight. `n` (the real N) is static."""

    def __init__(self, data, n: int):
        self.data, self.n = data, n

    def tree_flatten(self):
        return (self.data,), self.n

    @classmethod
    def tree_unflatten(cls, n, children):
        return cls(children[0], n)

    @property
    def dtype(self):
        return self.data.dtype


def low_precision(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 numpy -> storage numpy: float32, or bfloat16 as its uint16 bits (round to nearest even)."""
    from st_sdk.weights.tensor import f32_to_bf16

    return f32_to_bf16(x) if dtype == "bfloat16" else np.ascontiguousarray(x, np.float32)


def convert(t, dtype: str, rows_out: int | None = None, block_rows: int = 4096) -> np.ndarray:
    """A stored 2-D/3-D WeightTensor -> storage numpy [..., rows_out, K] (rows zero-padded up to
    rows_out), dequantised a block of rows at a time so a large tensor never has a float32 copy."""
    from st_sdk.weights.tensor import dequantize

    *lead, n, k = t.shape
    out = np.zeros((*lead, rows_out or n, k), np.uint16 if dtype == "bfloat16" else np.float32)
    mats = [t.expert(e) for e in range(lead[0])] if lead else [t]
    for e, m in enumerate(mats):
        dst = out[e] if lead else out
        for r in range(0, n, block_rows):
            rr = min(n, r + block_rows)
            if m.fmt == "bf16" and dtype == "bfloat16":              # already the bits we keep
                dst[r:rr] = m.data[r:rr]
            else:
                dst[r:rr] = low_precision(dequantize(m.fmt, m.data[r:rr], (rr - r, k)), dtype)
    return out


def pack(t, dtype: str, chunk_elems: int) -> Packed:
    """A stored [..., N, K] WeightTensor -> Packed ("float32" or "bfloat16"), about chunk_elems
    per chunk. bfloat16 is kept as its uint16 bits: XLA's CPU code for bf16-typed arrays is several
    times slower than a shift of uint16 into float32."""
    *lead, n, k = t.shape
    nb = max(1, round(n * k / chunk_elems))
    rows = -(-n // nb)
    nb = -(-n // rows)
    out = convert(t, dtype, nb * rows)
    return Packed(jnp.asarray(out.reshape(*lead, nb, rows, k)), n)


def f32(w):
    """float32 view of a weight: bfloat16 bits (uint16 on CPU) shifted, anything else converted."""
    if w.dtype == jnp.uint16:
        return lax.bitcast_convert_type(w.astype(jnp.uint32) << 16, F32)
    return w.astype(F32)


def _dot_t(x, w):
    """x [M, K] @ w[N, K].T in float32 (native low-precision dot with f32 accumulation off CPU)."""
    return lax.dot_general(x.astype(w.dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def matmul(x, w):
    """x [M, K] float32 times a weight [N, K] (Packed or plain) transposed -> [M, N] float32."""
    if isinstance(w, Packed):
        if w.data.shape[0] == 1:                                   # one chunk: no loop to compile
            return (x @ f32(w.data[0]).T)[:, :w.n]

        def body(_, chunk):
            return None, x @ f32(chunk).T
        _, out = lax.scan(body, None, w.data)                      # [nb, M, rows]
        return out.transpose(1, 0, 2).reshape(x.shape[0], -1)[:, :w.n]
    return _dot_t(x, w)


def expert_matmul(x, w, eids, active=None):
    """Rows of expert eids[j]: x [n or 1, M, K] (1: shared by all j), w [E, N, K] -> [n, M, N] f32.

    Only the picked experts' weights are read: a dynamic index into the stacked tensor (a gather).
    `active` [n] (optional) skips the j that are padding."""
    n = eids.shape[0]
    if isinstance(w, Packed):
        E, nb, rows, K = w.data.shape
        M = x.shape[1]

        def body(_, jc):
            j, c = jc // nb, jc % nb
            xj = x[0] if x.shape[0] == 1 else lax.dynamic_index_in_dim(x, j, 0, keepdims=False)

            def compute():
                chunk = lax.dynamic_slice(w.data, (eids[j], c, 0, 0), (1, 1, rows, K)).reshape(rows, K)
                return xj @ f32(chunk).T
            if active is None:
                return None, compute()
            return None, lax.cond(active[j], compute, lambda: jnp.zeros((M, rows), F32))
        _, out = lax.scan(body, None, jnp.arange(n * nb))           # [n * nb, M, rows]
        return out.reshape(n, nb, M, rows).transpose(0, 2, 1, 3).reshape(n, M, nb * rows)[..., :w.n]
    picked = jnp.take(w, eids, axis=0)                              # [n, N, K]
    xs = jnp.broadcast_to(x, (n, *x.shape[1:])).astype(w.dtype)
    return jnp.einsum("jmk,jnk->jmn", xs, picked, preferred_element_type=F32)


def embed(table, ids):
    rows = table.data.reshape(-1, table.data.shape[-1]) if isinstance(table, Packed) else table
    return f32(jnp.take(rows, ids, axis=0))


def rms_norm(x, w, eps: float):
    x = x.astype(F32)
    return w * (x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_tables(positions: np.ndarray, hd: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [T, hd/2] computed in float64 like the reference (float32 angles lose digits at far
    positions)."""
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angle = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope(x, cos, sin):
    """x [T, n, hd]; cos/sin [T, hd/2]: NeoX rotate-half over all hd dims."""
    half = x.shape[-1] // 2
    c = jnp.concatenate([cos, cos], axis=-1)[:, None, :]
    s = jnp.concatenate([sin, sin], axis=-1)[:, None, :]
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * c + rotated * s


def attention(q, keys, vals, kpos, kvalid, qpos, window: int | None):
    """q [T, nH, hd] over keys/vals [S, nKV, hd] at kpos [S] (kvalid marks real entries) -> [T, nH*hd]."""
    T, nH, hd = q.shape
    nKV = keys.shape[1]
    qg = q.reshape(T, nKV, nH // nKV, hd)                            # query head h reads kv head h // group
    scores = jnp.einsum("tkgd,skd->kgts", qg, f32(keys)) / math.sqrt(hd)
    visible = kvalid[None, :] & (kpos[None, :] <= qpos[:, None])
    if window:
        visible &= kpos[None, :] > qpos[:, None] - window
    scores = jnp.where(visible, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", p, f32(vals))
    return out.reshape(T, nH * hd)


def attend_and_append(q, k, v, kv, pos, valid, window: int | None):
    """Attention of this step's queries over the cache plus this step's keys, and the cache with this
    step's valid keys written in (slot = position, or position % window on a ring); returns (out, kv).

    One token writes first and reads the cache alone (no copy of it); a chunk reads cache + chunk,
    because its own keys may overwrite ring slots that its earlier queries still need."""
    K, V, P = kv
    C = K.shape[0]
    T = q.shape[0]
    if window:
        last = jnp.max(jnp.where(valid, pos, -1))
        keep = valid & (pos > last - window)        # rows that would be overwritten within the chunk
        slots = jnp.where(keep, pos % window, C)
    else:
        slots = jnp.where(valid, pos, C)
    if T == 1:
        s = slots[0]
        K = lax.dynamic_update_slice(K, k.astype(K.dtype), (s, 0, 0))
        V = lax.dynamic_update_slice(V, v.astype(V.dtype), (s, 0, 0))
        P = lax.dynamic_update_slice(P, pos.astype(P.dtype), (s,))
        out = attention(q, K, V, P, P >= 0, pos, window)
        return out, (K, V, P)
    keys = jnp.concatenate([f32(K), k])
    vals = jnp.concatenate([f32(V), v])
    kpos = jnp.concatenate([P, pos.astype(P.dtype)])
    kvalid = jnp.concatenate([P >= 0, valid])
    out = attention(q, keys, vals, kpos, kvalid, pos, window)
    K = K.at[slots].set(k.astype(K.dtype), mode="drop")
    V = V.at[slots].set(v.astype(V.dtype), mode="drop")
    P = P.at[slots].set(pos.astype(P.dtype), mode="drop")
    return out, (K, V, P)


def route(x, router, k: int, softmax: bool):
    """Top-k of the router logits on the raw layer input -> (weights [T, k] f32, ids [T, k] int32)."""
    logits = lax.dot_general(x.astype(F32), router, (((1,), (1,)), ((), ())),
                             precision=lax.Precision.HIGHEST)
    top, idx = lax.top_k(logits, k)
    w = jnp.exp(top - top.max(axis=-1, keepdims=True)) if softmax else jax.nn.sigmoid(top)
    return w / w.sum(axis=-1, keepdims=True), idx


def moe(x, gate, up, down, ids, weights, n_experts: int):
    """ReGLU experts: sum_j w[t,j] * down(up(x) * relu(gate(x))) for e = ids[t, j].

    Few (token, expert) pairs (decode): gather each pair's expert. Many (prefill): group the pairs by
    expert into tiles of static size (a stable sort), one expert per tile, so each tile is a small
    matmul against one expert's weights; the tile count is a static bound and spare tiles are skipped."""
    T, k = ids.shape
    H = x.shape[-1]
    n = T * k
    if n <= n_experts:
        eids = ids.reshape(-1)
        xs = jnp.repeat(x, k, axis=0)[:, None, :]                  # [T*k, 1, H]
        g = expert_matmul(xs, gate, eids)[:, 0]
        u = expert_matmul(xs, up, eids)[:, 0]
        a = u * jnp.maximum(g, 0.0) * weights.reshape(-1, 1)
        y = expert_matmul(a[:, None, :], down, eids)[:, 0]          # [T*k, H]
        return y.reshape(T, k, H).sum(axis=1)
    tile = max(8, n // n_experts)
    n_tiles = -(-n // tile) + n_experts                             # sum_e ceil(count_e / tile) <= this
    flat_e = ids.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sorted_tok, sorted_w = order // k, weights.reshape(-1)[order]
    counts = jnp.zeros(n_experts, jnp.int32).at[flat_e].add(1)
    tiles_per_e = (counts + tile - 1) // tile
    tiles_end = jnp.cumsum(tiles_per_e)
    group_start = jnp.cumsum(counts) - counts
    t_idx = jnp.arange(n_tiles)
    tile_e = jnp.searchsorted(tiles_end, t_idx, side="right")      # == n_experts for spare tiles
    used = tile_e < n_experts
    tile_e = jnp.minimum(tile_e, n_experts - 1)
    local = t_idx - (tiles_end[tile_e] - tiles_per_e[tile_e])       # tile number within its expert
    offset = local[:, None] * tile + jnp.arange(tile)[None, :]      # [n_tiles, tile] row within the group
    real = used[:, None] & (offset < counts[tile_e][:, None])
    rows = jnp.minimum(group_start[tile_e][:, None] + offset, n - 1)
    tok = sorted_tok[rows]                                          # [n_tiles, tile]
    wrow = jnp.where(real, sorted_w[rows], 0.0)
    xs = x[tok]                                                     # [n_tiles, tile, H]
    g = expert_matmul(xs, gate, tile_e, used)
    u = expert_matmul(xs, up, tile_e, used)
    a = u * jnp.maximum(g, 0.0) * wrow[..., None]
    y = expert_matmul(a, down, tile_e, used)                        # [n_tiles, tile, H]
    return jnp.zeros((T, H), F32).at[tok.reshape(-1)].add(y.reshape(-1, H))
