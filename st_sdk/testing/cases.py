"""The conformance cases: each runs one op (or the whole model) on the backend under test and on the
NumPy reference with the same stored weights and inputs, and measures the difference.

A case is a function `case(ctx) -> list[Measure]`; `CASES[op]` lists (case name, function). Inputs
cross into the backend exactly as the graph sends them: activations through `from_numpy`, token ids
and positions as int64 NumPy arrays, weights as `Param`s whose `value` the backend's `prepare` made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..backend import Backend, Param, bind_ops, prepare_params
from ..config import ModelConfig
from ..weights.tensor import WeightTensor
from . import data


@dataclass
class Measure:
    label: str            # which step or output of the case
    err: float            # max|got - want| / max|want|; inf for a wrong shape, id set or exception
    detail: str = ""


@dataclass
class Ctx:
    backend: Backend
    reference: Backend
    fmt: str | None
    dtype: Any
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    # weights: the backend gets its prepared form, the reference the stored tensor
    def weight(self, name: str, x: np.ndarray, role: str, fmt: str | None = None) -> tuple[Param, Param]:
        raw = data.tensor(name, x, fmt or self.fmt or "f32")
        return Param(raw, self.backend.prepare(Param(raw), role)), Param(raw)

    def call(self, op: str, *args):
        """Run `op` on the backend; convert activation outputs to float32 NumPy."""
        out = getattr(self.backend, op)(*args)
        if isinstance(out, tuple):
            return tuple(self.backend.to_numpy(o) for o in out)
        return self.backend.to_numpy(out)

    def x(self, a: np.ndarray):
        return self.backend.from_numpy(np.ascontiguousarray(a, np.float32))


def compare(label: str, got, want) -> Measure:
    got, want = np.asarray(got), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Measure(label, math.inf, f"shape {list(got.shape)}, expected {list(want.shape)}")
    if not np.isfinite(got).all():
        return Measure(label, math.inf, "non-finite values")
    scale = float(np.max(np.abs(want))) or 1.0
    diff = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return Measure(label, float(diff[worst]) / scale,
                   f"worst at {list(map(int, worst))}: got {float(got[worst]):.6g}, want {float(want[worst]):.6g}")


# ---- embed, rms_norm, linear ---------------------------------------------------------------------

def embed_case(ctx: Ctx) -> list[Measure]:
    b, r = ctx.weight("embed", ctx.rng.standard_normal((64, 64 * data.width(ctx.fmt))), "embed")
    ids = np.array([0, 5, 5, 63, 17], np.int64)      # first, last and a repeated row
    return [compare("rows", ctx.call("embed", b, ids), ctx.reference.embed(r, ids))]


def rms_norm_case(scale: float, eps: float, T: int):
    def case(ctx: Ctx) -> list[Measure]:
        b, r = ctx.weight("norm", ctx.rng.uniform(0.5, 1.5, 64), "attn_norm")
        x = scale * ctx.rng.standard_normal((T, 64)).astype(np.float32)
        return [compare("out", ctx.call("rms_norm", ctx.x(x), b, eps), ctx.reference.rms_norm(x, r, eps))]
    return case


def linear_case(T: int, n_in: int, n_out: int, role: str):
    """Dimensions grow with the format's block (data.width)."""
    def case(ctx: Ctx) -> list[Measure]:
        i, o = n_in * data.width(ctx.fmt), n_out * data.width(ctx.fmt)
        b, r = ctx.weight(role, ctx.rng.standard_normal((o, i)) / np.sqrt(i), role)
        x = ctx.rng.standard_normal((T, i)).astype(np.float32)
        return [compare("out", ctx.call("linear", ctx.x(x), b), ctx.reference.linear(x, r))]
    return case


# ---- rope, attention -----------------------------------------------------------------------------

def _config(n_heads: int, n_kv: int, hd: int, theta: float = 1e4, window: int | None = None) -> ModelConfig:
    """Two layers (a global one and one with `window`) of these attention shapes."""
    return ModelConfig(vocab_size=32, hidden_size=n_heads * hd, num_hidden_layers=2,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hd,
                       moe_num_primary_experts=2, moe_num_active_primary_experts=1, moe_ffn_hidden_size=32,
                       rope_layout=(1, 1), sliding_window_layout=(0, 1), sliding_window_size=window or 4,
                       rope_theta=theta, max_position_embeddings=2048, source="<conformance attention>")


def qkv_case(T: int):
    def case(ctx: Ctx) -> list[Measure]:
        h = 64 * data.width(ctx.fmt)
        x = ctx.rng.standard_normal((T, h)).astype(np.float32)
        ws = [ctx.weight(role, ctx.rng.standard_normal((n, h)) / np.sqrt(h), role)
              for role, n in (("wq", 128), ("wk", 32), ("wv", 32))]
        got = ctx.call("qkv", ctx.x(x), *(b for b, _ in ws))
        want = [ctx.reference.linear(x, r) for _, r in ws]
        return [compare(name, g, w) for name, g, w in zip("qkv", got, want)]
    return case


def rope_case(positions, n: int, hd: int, theta: float):
    def case(ctx: Ctx) -> list[Measure]:
        pos = np.asarray(positions, np.int64)
        cfg = _config(n, 1, hd, theta)
        q = ctx.rng.standard_normal((len(pos), n, hd)).astype(np.float32)
        k = ctx.rng.standard_normal((len(pos), 1, hd)).astype(np.float32)
        with ctx.backend.context(cfg, pos) as bstep:
            got = ctx.call("rope", ctx.x(q), ctx.x(k), bstep)
        want = ctx.reference.rope(q, k, ctx.reference.context(cfg, pos))
        return [compare("q", got[0], want[0]), compare("k", got[1], want[1])]
    return case


def attention_case(steps: list[int], window: int | None, n_heads: int, n_kv: int, hd: int = 16):
    """Feed chunks of `steps` tokens through one layer's cache (prefill, more chunks, decode) and
    compare every chunk's output: the cache must hold what earlier chunks appended."""
    def case(ctx: Ctx) -> list[Measure]:
        cfg = _config(n_heads, n_kv, hd, window=window)
        layer = 1 if window else 0
        bcache = ctx.backend.new_cache(cfg, 8).layers[layer]     # small capacity: global layers must grow
        rcache = ctx.reference.new_cache(cfg, 8).layers[layer]
        out, start = [], 0
        for n in steps:
            pos = np.arange(start, start + n, dtype=np.int64)
            q = ctx.rng.standard_normal((n, n_heads, hd)).astype(np.float32)
            k = ctx.rng.standard_normal((n, n_kv, hd)).astype(np.float32)
            v = ctx.rng.standard_normal((n, n_kv, hd)).astype(np.float32)
            with ctx.backend.context(cfg, pos) as bstep:
                got, bcache = ctx.backend.attention(ctx.x(q), ctx.x(k), ctx.x(v), bcache, bstep, window)
            want, rcache = ctx.reference.attention(q, k, v, rcache, ctx.reference.context(cfg, pos), window)
            out.append(compare(f"positions {start}..{start + n - 1}", ctx.backend.to_numpy(got), want))
            start += n
        return out
    return case


# ---- route, moe ----------------------------------------------------------------------------------

def _separated_inputs(ctx: Ctx, router: np.ndarray, T: int, k: int) -> np.ndarray:
    """Raw layer inputs whose k-th and (k+1)-th router logits are well apart, so that rounding in a
    correct backend cannot change which experts are picked."""
    E, H = router.shape
    rows = []
    while len(rows) < T:
        x = 2.0 * ctx.rng.standard_normal(H)
        logits = np.sort(router @ x)[::-1]
        if k == E or logits[k - 1] - logits[k] > 0.05 * np.std(logits):
            rows.append(x)
    return np.array(rows, np.float32)


def route_case(E: int, k: int, softmax: bool, T: int = 6):
    def case(ctx: Ctx) -> list[Measure]:
        b, r = ctx.weight("router", ctx.rng.standard_normal((E, 64)) / 8.0, "router")
        x = _separated_inputs(ctx, r.raw.numpy(), T, k)
        try:
            w, ids = ctx.call("route", ctx.x(x), b, k, softmax)
        except Exception as e:
            return [Measure("call", math.inf, f"{type(e).__name__}: {e}")]
        rw, rids = ctx.reference.route(x, r, k, softmax)
        w, ids = np.asarray(w, np.float64), np.asarray(ids)
        if ids.shape != rids.shape or w.shape != rw.shape:
            return [Measure("shape", math.inf, f"weights {list(w.shape)} ids {list(ids.shape)}, "
                                              f"expected {list(rw.shape)} each")]
        ids = ids.astype(np.int64)
        for t in range(T):
            if set(ids[t].tolist()) != set(rids[t].tolist()):
                return [Measure("ids", math.inf, f"token {t} picked experts {sorted(ids[t].tolist())}, "
                                                 f"expected {sorted(rids[t].tolist())}")]
        # the order of the k picks is free: compare each expert's weight
        order = np.argsort(ids, axis=1)
        rorder = np.argsort(rids, axis=1)
        return [Measure("ids", 0.0, "same expert sets"),
                compare("weights", np.take_along_axis(w, order, 1), np.take_along_axis(rw, rorder, 1))]
    return case


def moe_case(T: int, E: int, k: int, layout: str):
    """Experts from `ops.route` (the backend's own when it provides one, as the graph calls it), so
    several tokens share experts and some experts stay idle; experts stacked or per-expert."""
    def case(ctx: Ctx) -> list[Measure]:
        H, F = 64 * data.width(ctx.fmt), 32 * data.width(ctx.fmt)
        weights = {}
        for part, shape in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F))):
            x = ctx.rng.standard_normal((E, *shape)) / np.sqrt(shape[1])
            fmt = ctx.fmt or "f32"
            if layout == "gguf":
                raw = data.tensor(f"ffn_{part}_exps", x, fmt)
            else:
                raw = WeightTensor.stack(f"experts.*.{part}",
                                              [data.tensor(f"experts.{e}.{part}", x[e], fmt) for e in range(E)])
            weights[part] = (Param(raw, ctx.backend.prepare(Param(raw), part)), Param(raw))
        rb, rr = ctx.weight("router", ctx.rng.standard_normal((E, H)) / 8.0, "router",
                            fmt=data.storage_format("router", 2, ctx.fmt or "f32"))
        x = ctx.rng.standard_normal((T, H)).astype(np.float32)
        ops = bind_ops(ctx.backend, ctx.reference)
        w, ids = ops.route(ctx.x(x), rb, k, False)
        rw = ctx.backend.to_numpy(w)
        rids = np.asarray(ctx.backend.to_numpy(ids)).astype(np.int64)
        got = ctx.call("moe", ctx.x(x), weights["gate"][0], weights["up"][0], weights["down"][0], ids, w)
        want = ctx.reference.moe(x, weights["gate"][1], weights["up"][1], weights["down"][1], rids, rw)
        shared = len(np.unique(rids)) < rids.size
        return [compare("out" + (" (experts shared)" if shared else ""), got, want)]
    return case


# ---- fused layer / forward and the whole model --------------------------------------------------

def _model_config(ctx: Ctx) -> ModelConfig:
    from .tolerances import LOSSY, tolerance

    cfg = data.model_config(ctx.fmt)
    if tolerance(ctx.fmt, ctx.dtype, "model") > LOSSY:
        cfg = cfg.replace(moe_num_active_primary_experts=cfg.moe_num_primary_experts)
    return cfg


def _params(ctx: Ctx, cfg: ModelConfig):
    raw = data.random_params(cfg, ctx.fmt or "f32", seed=ctx.seed)
    return prepare_params(ctx.backend, raw, cfg), prepare_params(ctx.reference, raw, cfg)


def layer_case(layer: int, steps: list[int]):
    def case(ctx: Ctx) -> list[Measure]:
        from ..graph import decoder_layer

        cfg = _model_config(ctx)
        bparams, rparams = _params(ctx, cfg)
        ops, ref_ops = bind_ops(ctx.backend, ctx.reference), bind_ops(ctx.reference, ctx.reference)
        bcache, rcache = ops.new_cache(cfg, 4), ref_ops.new_cache(cfg, 4)
        out, start = [], 0
        for n in steps:
            pos = np.arange(start, start + n, dtype=np.int64)
            h = ctx.rng.standard_normal((n, cfg.hidden_size)).astype(np.float32)
            with ctx.backend.context(cfg, pos) as bstep:
                got, bcache.layers[layer] = ctx.backend.layer(cfg, layer, bparams.layers[layer], ctx.x(h), bstep,
                                                              bcache.layers[layer])
            want, rcache.layers[layer] = decoder_layer(ref_ops, cfg, layer, rparams.layers[layer], h,
                                                       ref_ops.context(cfg, pos), rcache.layers[layer])
            got = ctx.backend.to_numpy(got)
            out.append(compare(f"positions {start}..{start + n - 1}", got, want))
            start += n
        return out
    return case


def forward_case(steps: list[tuple[int, bool]]):
    def case(ctx: Ctx) -> list[Measure]:
        from ..graph import forward

        cfg = _model_config(ctx)
        bparams, rparams = _params(ctx, cfg)
        ref_ops = bind_ops(ctx.reference, ctx.reference)
        bcache = bind_ops(ctx.backend, ctx.reference).new_cache(cfg, 4)
        rcache = ref_ops.new_cache(cfg, 4)
        out, start = [], 0
        for n, last_only in steps:
            ids = ctx.rng.integers(0, cfg.vocab_size, n).astype(np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)
            got = ctx.call("forward", cfg, bparams, ids, pos, bcache, last_only)
            want = forward(ref_ops, cfg, rparams, ids, pos, rcache, last_only)
            out.append(compare(f"positions {start}..{start + n - 1}{' last' if last_only else ''}", got, want))
            start += n
        return out
    return case


def model_case(kind: str):
    """Whole-model logits through `Model` (every op the backend provides, the rest falling back)."""
    def case(ctx: Ctx) -> list[Measure]:
        from ..model import Model

        cfg = _model_config(ctx)
        bparams, rparams = _params(ctx, cfg)
        model = Model(cfg, bparams, ctx.backend, bind_ops(ctx.backend, ctx.reference))
        ids = np.random.default_rng(ctx.seed + 1).integers(0, cfg.vocab_size, data.MODEL_TOKENS)
        full = model.logits(ids)
        if kind == "logits":
            ref = Model(cfg, rparams, ctx.reference, bind_ops(ctx.reference, ctx.reference))
            return [compare(f"{len(ids)} tokens, window {cfg.sliding_window_size}", full, ref.logits(ids))]
        s = model.session()
        if kind == "decode":
            steps = np.stack([s.feed([int(t)]) for t in ids])
            return [compare("token by token vs one pass", steps, full)]
        chunked = s.feed(ids, all_logits=True, chunk=3)
        return [compare("chunks of 3 vs one pass", chunked, full)]
    return case


Case = Callable[[Ctx], list[Measure]]

#: op -> [(case name, case)]; ops without weights ignore the format
CASES: dict[str, list[tuple[str, Case]]] = {
    "embed": [("rows", embed_case)],
    "rms_norm": [("prefill", rms_norm_case(3.0, 1e-6, 5)), ("decode", rms_norm_case(1.0, 1e-6, 1)),
                 ("eps-dominates", rms_norm_case(0.01, 1e-3, 4))],
    "linear": [("decode", linear_case(1, 64, 96, "wq")), ("prefill", linear_case(7, 64, 32, "wk")),
               ("q-wider-than-hidden", linear_case(3, 128, 64, "wo"))],
    "qkv": [("decode", qkv_case(1)), ("prefill", qkv_case(5))],
    "rope": [("from-0", rope_case(range(6), 3, 16, 1e4)),
             ("far-positions", rope_case(range(1000, 1004), 2, 128, 1.5e6)),
             ("decode", rope_case([37], 4, 32, 1.5e6))],
    "attention": [("global", attention_case([6], None, 4, 2)),
                  ("window", attention_case([9], 4, 4, 2)),
                  ("global-cached", attention_case([5, 3, 1, 1, 6], None, 4, 2)),
                  ("window-cached", attention_case([6, 3, 1, 1, 5], 4, 4, 2)),
                  ("gqa1-window", attention_case([3, 1, 6, 1], 3, 2, 2)),
                  ("gqa4-global", attention_case([4, 1, 1], None, 8, 2))],
    "route": [("sigmoid-top2", route_case(8, 2, False)), ("softmax-top2", route_case(8, 2, True)),
              ("sigmoid-all", route_case(4, 4, False)), ("softmax-top1", route_case(8, 1, True))],
    "moe": [("stacked", moe_case(6, 8, 2, "gguf")), ("per-expert", moe_case(6, 8, 2, "hf")),
            ("decode", moe_case(1, 8, 2, "gguf")), ("all-experts", moe_case(3, 4, 4, "gguf"))],
    "layer": [("nope-global", layer_case(0, [5, 1, 3])), ("rope-window", layer_case(1, [6, 1, 1, 4]))],
    "forward": [("prefill-then-decode", forward_case([(6, False), (1, True), (4, True), (3, False)]))],
    "model": [("logits", model_case("logits")), ("decode", model_case("decode")),
              ("chunked", model_case("chunked"))],
}

#: ops whose result depends on the stored weight format; the others run once, without one
WEIGHTED = {"embed", "rms_norm", "linear", "qkv", "route", "moe", "layer", "forward", "model"}
#: formats an op never sees in a real file (norms and routers stay full precision beside block formats)
NOT_STORED = {"rms_norm": data.QUANTISED, "route": data.QUANTISED}
