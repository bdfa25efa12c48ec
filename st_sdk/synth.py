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


def random_weights(cfg: ModelConfig, seed: int = 0):
    """Yield (hf_name, float32 array): normal(0, 0.02) like the reference init, norms near 1."""
    from .weights.layout import hf_shapes

    rng = np.random.default_rng(seed)
    for name, shape in hf_shapes(cfg).items():
        if len(shape) == 1:
            yield name, (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        else:
            yield name, (0.02 * rng.standard_normal(shape, dtype=np.float32))


def random_params(cfg: ModelConfig, seed: int = 0, fmt: str = "f32"):
    """ModelParams over random weights held in memory (HF layout), stored as `fmt`."""
    from .weights.layout import assemble
    from .weights.tensor import WeightTensor, quantize

    tensors = {}
    for name, x in random_weights(cfg, seed):
        f = fmt if x.ndim == 2 and not name.endswith("primary_router.weight") else "f32"
        if f in ("q8_0", "q4_0") and x.shape[-1] % 32:
            f = "f32"
        tensors[name] = WeightTensor(name, f, x.shape, quantize(f, x), "<synthetic>")
    return assemble(cfg, tensors.__getitem__, "hf")


def build_model(cfg: ModelConfig | str = "tiny", seed: int = 0, fmt: str = "f32", backend="numpy", **kw):
    """An in-memory model with random weights: what tests use when no file is needed."""
    from .model import build_model as _build

    if isinstance(cfg, str):
        cfg = preset_config(cfg)
    return _build(cfg, random_params(cfg, seed, fmt), backend=backend, weight_format=fmt, **kw)
