"""Tensor names and shapes of SmallThinker in HF and GGUF files, and their assembly into ModelParams."""
from __future__ import annotations

from typing import Callable

from ..backend import LayerParams, ModelParams, Param
from ..config import ModelConfig
from ..errors import WeightError
from .tensor import QUANT_SIZES, WeightTensor, fallback
from .validate import tensor_type


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF checkpoint with its [out, in] shape (experts one tensor each)."""
    H, E, F = cfg.hidden_size, cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size
    s = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "self_attn.q_proj.weight"] = (cfg.q_dim, H)
        s[p + "self_attn.k_proj.weight"] = (cfg.kv_dim, H)
        s[p + "self_attn.v_proj.weight"] = (cfg.kv_dim, H)
        s[p + "self_attn.o_proj.weight"] = (H, cfg.q_dim)
        s[p + "post_attention_layernorm.weight"] = (H,)
        s[p + "block_sparse_moe.primary_router.weight"] = (E, H)
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            s[q + "gate.weight"] = (F, H)
            s[q + "up.weight"] = (F, H)
            s[q + "down.weight"] = (H, F)
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, H)
    return s


def gguf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GGUF file with its numpy shape (experts stacked, as llama.cpp writes them)."""
    H, E, F = cfg.hidden_size, cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size
    s = {"token_embd.weight": (cfg.vocab_size, H), "output_norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        s[p + "attn_norm.weight"] = (H,)
        s[p + "attn_q.weight"] = (cfg.q_dim, H)
        s[p + "attn_k.weight"] = (cfg.kv_dim, H)
        s[p + "attn_v.weight"] = (cfg.kv_dim, H)
        s[p + "attn_output.weight"] = (H, cfg.q_dim)
        s[p + "ffn_norm.weight"] = (H,)
        s[p + "ffn_gate_inp.weight"] = (E, H)
        s[p + "ffn_gate_exps.weight"] = (E, F, H)
        s[p + "ffn_up_exps.weight"] = (E, F, H)
        s[p + "ffn_down_exps.weight"] = (E, H, F)
    if not cfg.tie_word_embeddings:
        s["output.weight"] = (cfg.vocab_size, H)
    return s


#: HF per-layer suffix -> (GGUF per-block name, LayerParams field)
LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", "attn_norm"),
    "self_attn.q_proj.weight": ("attn_q.weight", "wq"),
    "self_attn.k_proj.weight": ("attn_k.weight", "wk"),
    "self_attn.v_proj.weight": ("attn_v.weight", "wv"),
    "self_attn.o_proj.weight": ("attn_output.weight", "wo"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm"),
    "block_sparse_moe.primary_router.weight": ("ffn_gate_inp.weight", "router"),
}
EXPERT_NAMES = {"gate": ("ffn_gate_exps.weight", "gate"), "up": ("ffn_up_exps.weight", "up"),
                "down": ("ffn_down_exps.weight", "down")}


def gguf_extra_tensors(cfg: ModelConfig, names, source: str) -> None:
    """A SmallThinker GGUF holds exactly its model's tensors (llama.cpp refuses a file with more): an
    unknown one is a renamed or corrupt entry, and a renamed `output.weight` would silently tie the head."""
    extra = sorted(set(names) - set(gguf_shapes(cfg)))
    if extra:
        raise WeightError(f"{source}: tensor '{extra[0]}' is not part of a SmallThinker model with this config"
                          + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))


def check_shape(t: WeightTensor, want: tuple[int, ...]) -> WeightTensor:
    if tuple(t.shape) != tuple(want):
        raise WeightError(f"{t.source}: tensor '{t.name}' has shape {list(t.shape)}, expected {list(want)}")
    tensor_type(t, "norm" if len(want) == 1 else "weight")
    return t


def assemble(cfg: ModelConfig, get: Callable[[str], WeightTensor], fmt: str) -> ModelParams:
    """Build ModelParams from a file's tensors. `get(name)` returns a tensor or raises WeightError
    naming the file; fmt is 'hf' or 'gguf' and picks the names and the expert layout."""
    hf, gg = hf_shapes(cfg), gguf_shapes(cfg)

    def one(hf_name: str, gguf_name: str) -> Param:
        name, want = (hf_name, hf[hf_name]) if fmt == "hf" else (gguf_name, gg[gguf_name])
        return Param(check_shape(get(name), want))

    layers = []
    for i in range(cfg.num_hidden_layers):
        fields = {}
        for suffix, (gsuffix, field) in LAYER_NAMES.items():
            fields[field] = one(f"model.layers.{i}.{suffix}", f"blk.{i}.{gsuffix}")
        for part, (gname, field) in EXPERT_NAMES.items():
            if fmt == "hf":
                names = [f"model.layers.{i}.block_sparse_moe.experts.{e}.{part}.weight"
                         for e in range(cfg.moe_num_primary_experts)]
                parts = [check_shape(get(n), hf[n]) for n in names]
                fields[field] = Param(WeightTensor.stack(f"model.layers.{i}.block_sparse_moe.experts.*.{part}.weight",
                                                         parts, parts[0].source))
            else:
                name = f"blk.{i}.{gname}"
                fields[field] = Param(check_shape(get(name), gg[name]))
        layers.append(LayerParams(**fields))
    embed = one("model.embed_tokens.weight", "token_embd.weight")
    norm = one("model.norm.weight", "output_norm.weight")
    head = embed if cfg.tie_word_embeddings else one("lm_head.weight", "output.weight")
    return ModelParams(embed=embed, layers=layers, norm=norm, head=head)


def hf_to_gguf(cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """HF name -> (GGUF name, expert index within the stacked GGUF tensor, or None)."""
    m: dict[str, tuple[str, int | None]] = {"model.embed_tokens.weight": ("token_embd.weight", None),
                                            "model.norm.weight": ("output_norm.weight", None)}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = ("output.weight", None)
    for i in range(cfg.num_hidden_layers):
        for suffix, (gsuffix, _) in LAYER_NAMES.items():
            m[f"model.layers.{i}.{suffix}"] = (f"blk.{i}.{gsuffix}", None)
        for part, (gname, _) in EXPERT_NAMES.items():
            for e in range(cfg.moe_num_primary_experts):
                m[f"model.layers.{i}.block_sparse_moe.experts.{e}.{part}.weight"] = (f"blk.{i}.{gname}", e)
    return m


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms (1-D) and the router stay f32 in every format: a quantised router scrambles the top-k."""
    return len(shape) < 2 or name.endswith(("primary_router.weight", "ffn_gate_inp.weight"))


def storage_format(name: str, shape: tuple[int, ...], fmt: str) -> str:
    """The format a tensor is stored in when a model is written or converted to `fmt`."""
    if keeps_f32(name, shape):
        return "f32"
    if fmt in QUANT_SIZES:   # ggml blocks need rows of whole blocks: llama.cpp's fallback, else f32
        fmt = fallback(fmt, shape[-1])
        return "f32" if fmt == "f16" else fmt
    return fmt
