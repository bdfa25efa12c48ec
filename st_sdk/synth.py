"""Synthetic SmallThinker models: random weights with the real shapes, so nothing is ever downloaded."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig

PRESETS: dict[str, dict] = {
    # 21B-style hybrid: NoPE + global every 4th layer, RoPE + a short sliding window elsewhere; untied head
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, moe_num_primary_experts=8,
                 moe_num_active_primary_experts=2, moe_ffn_hidden_size=32, sliding_window_size=8,
                 tie_word_embeddings=False, max_position_embeddings=2048, hybrid=True),
    "4b-a0.6b": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=32, num_attention_heads=12,
                     num_key_value_heads=2, head_dim=128, moe_num_primary_experts=32,
                     moe_num_active_primary_experts=4, moe_ffn_hidden_size=768, sliding_window_size=4096,
                     tie_word_embeddings=True, max_position_embeddings=32768, hybrid=False),
    "21b-a3b": dict(vocab_size=151936, hidden_size=2560, num_hidden_layers=52, num_attention_heads=28,
                    num_key_value_heads=4, head_dim=128, moe_num_primary_experts=64,
                    moe_num_active_primary_experts=6, moe_ffn_hidden_size=768, sliding_window_size=4096,
                    tie_word_embeddings=False, max_position_embeddings=16384, hybrid=True),
}


def preset_config(preset: str, layers: int | None = None, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        from .errors import InputError
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = dict(PRESETS[preset])
    hybrid = p.pop("hybrid")
    L = layers or p["num_hidden_layers"]
    p["num_hidden_layers"] = L
    hybrid_layout = tuple(0 if i % 4 == 0 else 1 for i in range(L))
    p.setdefault("rope_layout", hybrid_layout if hybrid else (1,) * L)
    p.setdefault("sliding_window_layout", hybrid_layout if hybrid else (0,) * L)
    p.update(rope_theta=1.5e6, rms_norm_eps=1e-6)
    p.update(overrides)
    p.setdefault("source", f"<preset {preset}>")
    return ModelConfig(**p)


_TABLE: np.ndarray | None = None


def _normal_table() -> np.ndarray:
    """65536 sorted standard-normal samples: a 16-bit inverse-CDF table (fixed seed, built once)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = np.sort(np.random.default_rng(0x5EED).standard_normal(65536)).astype(np.float32)
    return _TABLE


def fast_normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    """float32 normal(0, scale) samples: random bytes through a 16-bit quantile table, ~3x faster than
    `standard_normal` (generation dominates writing the large presets)."""
    n = int(np.prod(shape))
    u = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    return (_normal_table() * np.float32(scale))[u].reshape(shape)


def random_weights(cfg: ModelConfig, seed: int = 0, routing_skew: float = 0.0, routing: str | None = None):
    """Yield (hf_name, float32 array) in HF order: normal(0, 0.02) like the reference init, norms near 1.

    routing_skew > 0 makes routing realistic for expert caching: every token embedding shares one
    direction, and in each layer a quarter of the experts' router rows lean towards it by about
    `routing_skew` standard deviations of a router logit, so those experts fire often and the rest rarely.
    routing: a routing spec 'NAME[:PARAM]' from ROUTINGS (see `routing_modifier`).
    """
    if routing and routing_skew:
        from .errors import InputError
        raise InputError("give either routing or routing_skew, not both")
    mod = routing_modifier(cfg, seed, routing) if routing else \
        _RoutingSkew(cfg, seed, routing_skew) if routing_skew else None
    return _draw(cfg, seed, mod)   # a bad routing spec fails here, before any file is written


def _draw(cfg: ModelConfig, seed: int, mod):
    from .weights.layout import hf_shapes

    rng = np.random.Generator(np.random.SFC64(seed))
    for name, shape in hf_shapes(cfg).items():
        if len(shape) == 1:
            x = 1.0 + fast_normal(rng, shape, 0.05)
        else:
            x = fast_normal(rng, shape, 0.02)
        yield name, mod.apply(name, x) if mod else x


class _RoutingSkew:
    def __init__(self, cfg: ModelConfig, seed: int, strength: float):
        rng = np.random.default_rng([seed, 0x5CE1])
        H, E = cfg.hidden_size, cfg.moe_num_primary_experts
        u = rng.standard_normal(H).astype(np.float32)
        self.u = u / np.linalg.norm(u)
        self.embed_shift = np.float32(0.02 * np.sqrt(H))            # as long as a random row
        # a router logit's spread is ~0.02 x |h|, and |h| ~ sqrt(2) x the embedding row length
        self.router_shift = np.float32(strength * 0.02 * np.sqrt(2.0))
        self.n_hot = max(1, round(0.25 * E))
        self.rng = rng

    def apply(self, name: str, x: np.ndarray) -> np.ndarray:
        if name == "model.embed_tokens.weight":
            return x + self.embed_shift * self.u
        if name.endswith("primary_router.weight"):
            hot = self.rng.choice(x.shape[0], self.n_hot, replace=False)
            x[hot] += self.router_shift * self.u
        return x


class _TrainedRouting:
    """Random weights that route like a measured model (st_sdk.routing.RoutingStats): per layer, the
    experts' shares of the picks (the measured popularity curve, re-cut for this model's expert count)
    and the fraction of ReGLU gate neurons that are zero.

    How: the first D = 1 + R coordinates of the residual stream (R = min(E, 16)) carry a designed
    signal no layer writes to (those rows of o_proj and of every expert's down are zero). Each token's
    embedding holds a constant A there, then R normal(0, 0.02) values g. Router rows read only those
    coordinates: logit_e = mu_e + g . v_e / 0.02, with unit v_e and offsets mu_e fitted (Monte Carlo)
    so that top-k picks land in the measured shares. Gate rows read only them too, as -beta A + g . u_j
    with unit u_j: rms-normalising scales all coordinates alike, so the sign, and with it
    relu(gate) == 0, depends only on the token, with probability Phi(beta A / 0.02) = the measured
    fraction. Routing therefore depends on the token, not on its context.

    Kernels that quantise activations in blocks (Q8_0's 32 values, Q8_K's 256, one scale each) would
    round those small coordinates to noise once the rest of the stream has grown past them (the 4b-a0.6b
    shape's later layers: 38-50% live in its Q4_0 file where 12-26% was stated). So the first `reserve`
    coordinates, whole blocks (256 where the width allows 4 of them, else 32), hold the designed signal
    and zeros: no embedding, o_proj or down row writes the rest of them."""

    A = 0.02

    def __init__(self, cfg: ModelConfig, seed: int, stats):
        from .errors import InputError

        self.cfg, self.stats = cfg, stats
        E, H = cfg.moe_num_primary_experts, cfg.hidden_size
        self.R = min(E, 16)
        self.D = 1 + self.R
        if H < 4 * self.D:
            raise InputError(f"--routing trained needs hidden_size >= {4 * self.D} for {E} experts, got {H}")
        self.reserve = next((n for n in (256, -(-self.D // 32) * 32) if H >= 4 * n), self.D)
        self.rng = np.random.default_rng([seed, 0x7A1D])
        self.fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.layer: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def _source_layer(self, i: int) -> int:
        return i * len(self.stats.layers) // self.cfg.num_hidden_layers

    def _fit(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(mu [E], v [E, R]) for measured layer j: logits mu + z . v (z ~ N(0, I_R)) whose top-k picks
        follow the measured shares, most chosen expert first."""
        from .routing import resample_shares

        if j not in self.fits:
            cfg = self.cfg
            E, k = cfg.moe_num_primary_experts, cfg.moe_num_active_primary_experts
            rng = np.random.default_rng([0x7A1D, j, E, k])
            target = np.minimum(k * resample_shares(self.stats.layers[j].expert_share, E), 0.98)
            target = np.maximum(target, 1e-4)
            target *= k / target.sum()
            v = rng.standard_normal((E, self.R))
            if E <= self.R:
                v = np.linalg.qr(v.T)[0].T                        # orthonormal: independent noise per expert
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            z = rng.standard_normal((4096, self.R)) @ v.T
            mu = np.zeros(E)
            for _ in range(100):
                top = np.argpartition(-(mu + z), k - 1, axis=1)[:, :k]
                freq = np.bincount(top.ravel(), minlength=E) / len(z)
                mu += 0.7 * (np.log(target) - np.log(np.maximum(freq, 0.5 / len(z))))
            self.fits[j] = (mu, v)
        return self.fits[j]

    def _layer(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(mu, v, beta) of layer i, experts in a random order per layer."""
        if i not in self.layer:
            from statistics import NormalDist

            j = self._source_layer(i)
            mu, v = self._fit(j)
            perm = self.rng.permutation(len(mu))
            zf = min(max(self.stats.layers[j].relu_zero_fraction, 0.001), 0.999)
            self.layer[i] = (mu[perm], v[perm], NormalDist().inv_cdf(zf) * 0.02 / self.A)
        return self.layer[i]

    def apply(self, name: str, x: np.ndarray) -> np.ndarray:
        D, A = self.D, np.float32(self.A)
        if name == "model.embed_tokens.weight":
            x[:, 0] = A                                             # x[:, 1:D] stay normal(0, 0.02)
            x[:, D:self.reserve] = 0.0
            return x
        if not name.startswith("model.layers."):
            return x
        i = int(name.split(".")[2])
        if name.endswith(("o_proj.weight", "down.weight")):
            x[:self.reserve] = 0.0                                  # nothing writes the designed coordinates
        elif name.endswith("post_attention_layernorm.weight"):
            x[:D] = 1.0
        elif name.endswith("primary_router.weight"):
            mu, v, _ = self._layer(i)
            x[:] = 0.0
            x[:, 0] = mu / A
            x[:, 1:D] = v / 0.02
        elif name.endswith("gate.weight"):
            _, _, beta = self._layer(i)
            u = self.rng.standard_normal((x.shape[0], self.R)).astype(np.float32)
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            x[:] = 0.0
            x[:, 0] = -beta
            x[:, 1:D] = u
        return x


def _routing_trained(cfg: ModelConfig, seed: int, param: str | None):
    from .data import routing_stats_path
    from .routing import RoutingStats

    return _TrainedRouting(cfg, seed, RoutingStats.load(param or routing_stats_path()))


def stated_routing(cfg: ModelConfig, shares, relu_zero_fraction: float = 0.5, source: str = ""):
    """RoutingStats with the same expert shares on every layer."""
    from .routing import LayerRouting, RoutingStats

    layer = LayerRouting(expert_share=[float(x) for x in shares], relu_zero_fraction=relu_zero_fraction, reuse=0.0)
    return RoutingStats(experts=cfg.moe_num_primary_experts, active=cfg.moe_num_active_primary_experts, tokens=0,
                        layers=[layer] * cfg.num_hidden_layers, source=source)


def zipf_shares(n: int, s: float) -> np.ndarray:
    """Shares of n experts proportional to 1 / rank**s (s = 0: uniform)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def _routing_uniform(cfg: ModelConfig, seed: int, param: str | None):
    from .errors import InputError

    if param:
        raise InputError(f"routing 'uniform' takes no parameter, got {param!r}")
    E = cfg.moe_num_primary_experts
    return _TrainedRouting(cfg, seed, stated_routing(cfg, np.full(E, 1.0 / E), source="uniform"))


def _routing_skewed(cfg: ModelConfig, seed: int, param: str | None):
    from .errors import InputError

    try:
        s = float(param) if param else 1.0
    except ValueError:
        s = -1.0
    if not 0 <= s <= 4:
        raise InputError(f"routing 'skewed:{param}': S must be a number from 0 to 4 (the Zipf exponent)")
    return _TrainedRouting(cfg, seed, stated_routing(cfg, zipf_shares(cfg.moe_num_primary_experts, s),
                                                     source=f"skewed:{s:g}"))


#: routing specs 'NAME[:PARAM]' of `st-sdk synth --routing`: NAME -> factory(cfg, seed, PARAM or None)
#: returning an object whose apply(hf_name, array) adjusts each freshly drawn tensor. Every one of them
#: makes routing depend on the token alone (see _TrainedRouting), so diverse tokens spread as stated.
ROUTINGS = {
    "trained": _routing_trained,    # PARAM: a routing statistics JSON (default: the shipped model's)
    # every expert of a layer equally often: the worst case for an expert cache
    "uniform": _routing_uniform,
    # PARAM S (default 1): the r-th most popular expert of each layer gets a share proportional to 1/r**S
    # (no share can pass 1/k, since a token picks an expert at most once: steeper curves are capped)
    "skewed": _routing_skewed,
}


def routing_modifier(cfg: ModelConfig, seed: int, spec: str):
    from .errors import InputError

    name, _, param = str(spec).partition(":")
    if name not in ROUTINGS:
        raise InputError(f"unknown routing {spec!r}; choose one of {', '.join(ROUTINGS)} (as NAME[:PARAM])")
    return ROUTINGS[name](cfg, seed, param or None)


def random_params(cfg: ModelConfig, seed: int = 0, fmt: str = "f32"):
    """ModelParams over random weights held in memory (HF layout), stored as `fmt`."""
    from .weights.layout import assemble, storage_format
    from .weights.tensor import WeightTensor, quantize

    tensors = {}
    for name, x in random_weights(cfg, seed):
        f = storage_format(name, x.shape, fmt)   # what a file of this format would store
        tensors[name] = WeightTensor(name, f, x.shape, quantize(f, x), "<synthetic>")
    return assemble(cfg, tensors.__getitem__, "hf")


def build_model(cfg: ModelConfig | str = "tiny", seed: int = 0, fmt: str = "f32", backend="numpy", **kw):
    """An in-memory model with random weights: what tests use when no file is needed."""
    from .loader import build_model as _build

    if isinstance(cfg, str):
        cfg = preset_config(cfg)
    return _build(cfg, random_params(cfg, seed, fmt), backend=backend, weight_format=fmt, **kw)


def synth_config(preset: str = "tiny", layers: int | None = None, **overrides) -> tuple[ModelConfig, "object"]:
    """(config, tokenizer) of a synthetic model: the preset plus the synthetic byte-level tokenizer's
    special ids (bos <|endoftext|>; eos <|im_end|> and <|endoftext|>)."""
    from .tokenizer import Tokenizer

    cfg = preset_config(preset, layers, **overrides)
    tok = Tokenizer.synthetic(cfg.vocab_size)
    ids = {}
    if "eos_token_id" not in overrides:
        ids["eos_token_id"] = tuple(tok.eos_ids)
    if "bos_token_id" not in overrides:
        ids["bos_token_id"] = tok.token_to_id("<|endoftext|>")
    return cfg.replace(**ids), tok


def write_model(out, preset: str = "tiny", layers: int | None = None, formats=("hf", "gguf"),
                dtype: str = "f32", seed: int = 0, shards: int = 1, routing_skew: float = 0.0,
                routing: str | None = None, **overrides) -> dict:
    """Write a random-weight SmallThinker to `out`: an HF directory (config.json, safetensors,
    tokenizer files) at `out` and/or `out/<preset>-<dtype>.gguf`, the same weights in both, streamed
    tensor by tensor. Returns {"hf": dir, "gguf": file} for what was written. routing_skew, routing:
    see `random_weights`."""
    from pathlib import Path

    from .errors import InputError
    from .weights.export import export

    formats = tuple(formats.split(",")) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in formats if f not in ("hf", "gguf")]
    if bad or not formats:
        raise InputError(f"formats={formats!r}: choose from 'hf' and 'gguf'")
    if not isinstance(shards, int) or shards < 1:
        raise InputError(f"shards must be a positive integer, got {shards!r}")
    cfg, tok = synth_config(preset, layers, **overrides)
    cfg = cfg.replace(source=f"<synthetic {preset}>")
    out = Path(out)
    return export(cfg, random_weights(cfg, seed, routing_skew, routing), dtype,
                  hf_dir=out if "hf" in formats else None,
                  gguf_path=out / f"{preset}-{dtype}.gguf" if "gguf" in formats else None,
                  shards=shards, tokenizer=tok, desc=f"synth {preset}", pure=True)
