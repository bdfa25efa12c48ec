"""Inputs of the conformance checks: small configs and random weights scaled so every part matters."""
from __future__ import annotations

import numpy as np

from ..backend import ModelParams
from ..config import ModelConfig
from ..weights.layout import assemble, gguf_shapes, hf_shapes
from ..weights.tensor import QUANT_SIZES, WeightTensor, block_size, quantize

#: the block formats: norms and routers stay full precision beside them
QUANTISED = tuple(QUANT_SIZES)

#: whole-model config: 21B-like hybrid (NoPE+global layer 0, RoPE + a window of 4 elsewhere), untied,
#: GQA 2, sigmoid router picking 2 of 4 experts; every dimension a multiple of 32 for Q8_0/Q4_0
MODEL_CONFIG = ModelConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_num_primary_experts=4, moe_num_active_primary_experts=2, moe_ffn_hidden_size=32,
    rope_layout=(0, 1, 1, 1), sliding_window_layout=(0, 1, 1, 1), sliding_window_size=4,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256,
    source="<conformance>")
MODEL_TOKENS = 12   # three windows long


def width(fmt: str | None) -> int:
    """The factor the checks' dimensions grow by so every row holds whole blocks of `fmt`: 1 for the
    blocks of 32, 8 for the k-quants' super-blocks of 256 (hidden 512, expert width 256)."""
    return max(1, block_size(fmt or "f32") // 32)


def model_config(fmt: str | None) -> ModelConfig:
    """MODEL_CONFIG widened for `fmt` (see width)."""
    w = width(fmt)
    if w == 1:
        return MODEL_CONFIG
    return MODEL_CONFIG.replace(hidden_size=MODEL_CONFIG.hidden_size * w, head_dim=MODEL_CONFIG.head_dim * w,
                                moe_ffn_hidden_size=MODEL_CONFIG.moe_ffn_hidden_size * w)


def tensor(name: str, x: np.ndarray, fmt: str) -> WeightTensor:
    """`x` stored as `fmt` (block formats need the last dimension to be a multiple of the block)."""
    x = np.ascontiguousarray(x, np.float32)
    return WeightTensor(name, fmt, x.shape, quantize(fmt, x), "<conformance>")


def storage_format(name: str, ndim: int, fmt: str) -> str:
    """What a real file holds: norms and the router stay in full precision beside block-quantised
    matrices (llama.cpp's converter does the same; a quantised router scrambles the top-k)."""
    vector_or_router = ndim == 1 or "router" in name or "gate_inp" in name
    return "f32" if fmt in QUANTISED and vector_or_router else fmt


def random_array(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 1:                       # norms: spread around 1 so a `1 + w` offset shows
        return rng.uniform(0.5, 1.5, shape)
    if name.startswith(("model.embed_tokens", "token_embd")):
        return rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(shape[-1])    # activations stay O(1) layer after layer


def random_params(cfg: ModelConfig, fmt: str = "f32", seed: int = 0, layout: str = "gguf") -> ModelParams:
    """Random ModelParams stored as `fmt`: experts stacked 3-D (`layout="gguf"`) or one tensor per
    expert (`layout="hf"`), the two ways loaded models hold them."""
    rng = np.random.default_rng(seed)
    shapes = gguf_shapes(cfg) if layout == "gguf" else hf_shapes(cfg)
    tensors = {n: tensor(n, random_array(n, s, rng), storage_format(n, len(s), fmt)) for n, s in shapes.items()}
    return assemble(cfg, tensors.__getitem__, layout)
