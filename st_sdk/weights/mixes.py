"""llama.cpp's quantisation mixes: which type each tensor of a GGUF gets for `--type q4_k_m` and the rest.

A mix names a main type and a few rules that give the tensors most sensitive to quantisation a higher
type: the LM head (or the tied embedding) Q6_K; attn_v and ffn_down of some layers a step or two up
(`use_more_bits`: the first and last eighth of the layers and every third layer between). These are the
rules of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the mixes st-sdk writes, so a
file written here holds the types llama-quantize would have chosen. Rows too short for a type's block
fall back as llama.cpp does (q4_k -> q5_0, q6_k -> q8_0, ...); norms and routers are never quantised.
"""
from __future__ import annotations

import re

from ..config import ModelConfig
from ..errors import InputError
from .layout import gguf_shapes, keeps_f32
from .tensor import FLOATS, fallback

#: mix -> its main type (llama.cpp's llama_ftype_get_default_type)
MIXES = {
    "f32": "f32", "f16": "f16", "bf16": "bf16",
    "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1",
    "q2_k": "q2_k", "q2_k_s": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k",
    "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs",
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _by_rule(mix: str, name: str, layer: int, cfg: ModelConfig, tied: bool) -> str:
    """llama_tensor_get_type_impl for one quantised tensor of a SmallThinker GGUF."""
    new = MIXES[mix]
    n = cfg.num_hidden_layers
    n_expert = cfg.moe_num_primary_experts
    gqa = cfg.num_attention_heads // max(1, cfg.num_key_value_heads)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return new if new == "q8_0" else "q6_k"   # (q8_0 when the row is too short: see `fallback`)
    if name == "token_embd.weight":
        return new
    if name.endswith("attn_v.weight"):
        if mix == "q2_k":
            new = "q4_k" if gqa >= 4 else "q3_k"
        elif mix == "q2_k_s" and gqa >= 4:
            new = "q4_k"
        elif mix == "q3_k_m":
            new = "q5_k" if layer < 2 else "q4_k"
        elif mix == "q3_k_l":
            new = "q5_k"
        elif mix in ("iq4_nl", "iq4_xs") and gqa >= 4:
            new = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n):
            new = "q6_k"
        elif mix == "q4_k_s" and layer < 4:
            new = "q5_k"
        return "q8_0" if n_expert == 8 else new
    if name.endswith("attn_k.weight"):
        return "q8_0" if n_expert == 8 else new
    if "ffn_down" in name:
        if mix == "q2_k":
            new = "q3_k"
        elif mix == "q2_k_s":
            new = "q4_k" if layer < n // 8 else new
        elif mix == "q3_k_m":
            new = "q5_k" if layer < n // 16 else "q4_k"
        elif mix == "q3_k_l":
            new = "q5_k"
        elif mix == "q4_k_m":
            new = "q6_k" if use_more_bits(layer, n) else new
        elif layer < n // 8 and mix in ("iq4_nl", "iq4_xs"):
            new = "q5_k"
        elif mix == "q5_k_m" and use_more_bits(layer, n):
            new = "q6_k"
        elif mix == "q4_k_s" and layer < n // 8:
            new = "q5_k"
        return new
    if name.endswith("attn_output.weight"):
        if n_expert == 8:
            return "q5_k" if mix in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs") else new
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, new)
    return new


def tensor_types(cfg: ModelConfig, mix: str, pure: bool = False) -> dict[str, str]:
    """GGUF tensor name -> stored type, for every tensor of `cfg` written as `mix` (pure: every matrix
    the main type, as `llama-quantize --pure`; the row-length fallback still applies)."""
    if mix not in MIXES:
        raise InputError(f"unknown type {mix!r}; choose one of {', '.join(MIXES)}")
    shapes = gguf_shapes(cfg)
    tied = "output.weight" not in shapes
    main = MIXES[mix]
    out = {}
    for name, shape in shapes.items():
        if keeps_f32(name, shape):
            out[name] = "f32"
        elif main in FLOATS:
            out[name] = main
        else:
            fmt = main if pure else _by_rule(mix, name, _layer(name), cfg, tied)
            out[name] = fallback(fmt, shape[-1])
    return out

