"""Validation of model files before anything is allocated or looped over.

The readers (`gguf_file.py`, `hf.py`, `config.py`, `tokenizer.py`) call these checks on what they
parsed: every count and size against sane bounds and against the file's size, GGUF alignment and
tensor packing (as llama.cpp's reader requires), duplicate names, tensor types against what the
architecture expects, HF config types (booleans are booleans, numbers finite), safetensors entries
covering the data region without holes or overlaps (as the safetensors library requires), shard
paths inside the model directory, and tokenizer vocabularies. Each failure is a `WeightError`,
`ConfigError` or `TokenizerError` naming the file and the field or tensor.
"""
from __future__ import annotations

import math
import posixpath
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TokenizerError, WeightError

#: sane upper bounds of the hyper-parameters (far above any released model, far below what would
#: make a loop or an allocation run away)
BOUNDS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 17, "num_hidden_layers": 1024, "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12, "head_dim": 1 << 12, "moe_num_primary_experts": 1 << 14,
    "moe_num_active_primary_experts": 1 << 14, "moe_ffn_hidden_size": 1 << 18,
    "max_position_embeddings": 1 << 24, "sliding_window_size": 1 << 24,
}
GGML_MAX_DIMS = 4
#: ggml types that hold floating-point values element by element (norms must be one of these)
FLOAT_TYPES = ("f32", "f16", "bf16", "f64")
#: ggml types that hold integers: never a weight
INT_TYPES = ("i8", "i16", "i32", "i64")
#: the smallest bytes per KV pair (key length, a 1-byte key, type, a 1-byte value) and per tensor
#: info (name length, a 1-byte name, n_dims, one dim, type, offset)
MIN_KV_BYTES = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


# ---- GGUF --------------------------------------------------------------------------------------------
def ggml_types() -> dict[int, tuple[str, int, int]]:
    """Every ggml type gguf-py knows: id -> (lower-case name, block size, bytes per block)."""
    import gguf

    return {int(t): (t.name.lower(), int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}


def gguf_counts(path: Path, size: int, n_tensors: int, n_kv: int) -> None:
    """The header's counts against what the file can hold."""
    if n_kv > (size - 24) // MIN_KV_BYTES:
        raise WeightError(f"{path}: the header declares {n_kv} metadata entries, more than a file of {size} "
                          "bytes can hold: corrupt or truncated")
    if n_tensors > (size - 24) // MIN_TENSOR_INFO_BYTES:
        raise WeightError(f"{path}: the header declares {n_tensors} tensors, more than a file of {size} bytes "
                          "can hold: corrupt or truncated")


def gguf_array_length(n: int, item_bytes: int, pos: int, size: int) -> None:
    if n > (size - pos) // max(item_bytes, 1):
        raise WeightError(f"an array of {n} elements runs past the end of the file")


def gguf_alignment(path: Path, fields: dict[str, Any]) -> int:
    align = fields.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise WeightError(f"{path}: metadata 'general.alignment' must be a positive power of two, got {align!r}")
    return align


def gguf_tensor_table(path: Path, infos: list[tuple[str, tuple[int, ...], int, int]], align: int,
                      data_start: int, size: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (ggml type name upper-case, numpy shape, absolute offset, bytes) after checking each
    tensor's dims, type, alignment and extent, and that the tensors are packed one after the other in
    the order listed (ggml's rule), the last ending where the file ends (give or take the padding)."""
    types = ggml_types()
    table: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    expected = 0
    for name, dims, ttype, offset in infos:
        where = f"{path}: tensor '{name}'"
        if name in table:
            raise WeightError(f"{where} appears twice in the file")
        if not 1 <= len(dims) <= GGML_MAX_DIMS:
            raise WeightError(f"{where} has {len(dims)} dimensions (1 to {GGML_MAX_DIMS} allowed)")
        if any(d < 1 for d in dims):
            raise WeightError(f"{where} has an empty dimension {list(dims)}")
        if ttype not in types:
            raise WeightError(f"{where} has unknown ggml type id {ttype}")
        tname, block, type_size = types[ttype]
        if dims[0] % block:
            raise WeightError(f"{where} has type {tname.upper()} with blocks of {block} but rows of {dims[0]} "
                              "elements")
        n = math.prod(dims)   # Python integers: no wrap-around
        nbytes = n // block * type_size
        if offset % align:
            raise WeightError(f"{where} lies at data offset {offset}, not a multiple of the alignment {align}")
        if offset != expected:
            raise WeightError(f"{where} lies at data offset {offset} but the tensors before it end at "
                              f"{expected}: overlapping, misplaced, or of another type or shape than the data")
        if data_start + offset + nbytes > size:
            raise WeightError(f"{where} extends past the end of the file: truncated")
        expected = offset + -(-nbytes // align) * align
        table[name] = (tname.upper(), tuple(reversed(dims)), data_start + offset, nbytes)
    end = data_start + expected
    if size > end:
        raise WeightError(f"{path}: {size - end} bytes after the last tensor's data: the header lists fewer "
                          "tensors than the file holds (corrupt tensor count?)")
    return table


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def gguf_metadata(path: Path, fields: dict[str, Any], arch: str) -> None:
    """Types and bounds of the `{arch}.*` keys SmallThinker reads, before any is used."""
    ints = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
            "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
            "attention.key_length": "head_dim", "expert_count": "moe_num_primary_experts",
            "expert_used_count": "moe_num_active_primary_experts",
            "expert_feed_forward_length": "moe_ffn_hidden_size", "feed_forward_length": "moe_ffn_hidden_size",
            "context_length": "max_position_embeddings", "attention.sliding_window": "sliding_window_size",
            "expert_gating_func": None}
    for key, field in ints.items():
        v = fields.get(f"{arch}.{key}")
        if v is None:
            continue
        if isinstance(v, list) and key.startswith("attention.head_count"):   # per-layer counts
            if not v or any(x != v[0] for x in v):
                raise ConfigError(f"{path}: metadata '{arch}.{key}' differs between layers ({v[:8]}...); "
                                  "SmallThinker has one value for every layer")
            v = v[0]
        bound = BOUNDS.get(field, 1 << 31) if field else 1 << 8
        if not _int(v) or not 1 <= v <= bound:
            raise ConfigError(f"{path}: metadata '{arch}.{key}' must be an integer in 1..{bound}, got {v!r}")
    gating = fields.get(f"{arch}.expert_gating_func")
    if gating is not None and gating not in (1, 2):
        raise ConfigError(f"{path}: metadata '{arch}.expert_gating_func' must be 1 (softmax) or 2 (sigmoid), "
                          f"got {gating!r}")
    for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
        v = fields.get(f"{arch}.{key}")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise ConfigError(f"{path}: metadata '{arch}.{key}' must be a finite positive number, got {v!r}")
    for key in ("bos", "eos", "eot", "eom", "padding"):
        v = fields.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and not _int(v):
            raise ConfigError(f"{path}: metadata 'tokenizer.ggml.{key}_token_id' must be an integer, got {v!r}")


# ---- HF config.json ------------------------------------------------------------------------------------
def hf_config(d: dict[str, Any], source: str) -> None:
    """Types and bounds of every config.json field SmallThinker reads, before any is used."""
    def bad(name: str, want: str) -> ConfigError:
        return ConfigError(f"{source}: field '{name}' must be {want}, got {d[name]!r}")

    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise bad("architectures", "a list of strings")
    for name, bound in BOUNDS.items():
        if name in d and d[name] is not None:
            v = d[name]
            if not _int(v) or not 1 <= v <= bound:
                raise bad(name, f"an integer in 1..{bound}")
    for name in ("tie_word_embeddings", "moe_primary_router_apply_softmax"):
        if name in d and d[name] is not None and not isinstance(d[name], bool):
            raise bad(name, "true or false")
    for name in ("rope_theta", "rms_norm_eps"):
        if name in d and d[name] is not None:
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "a finite positive number")
    L = d.get("num_hidden_layers")
    for name in ("rope_layout", "sliding_window_layout"):
        if name in d and d[name] is not None and _int(L):
            v = d[name]
            if not isinstance(v, list) or any(x not in (0, 1) or isinstance(x, bool) for x in v) or len(v) != L:
                raise bad(name, f"a list of {L} zeros and ones")
    if d.get("bos_token_id") is not None and not _int(d["bos_token_id"]):
        raise bad("bos_token_id", "an integer or null")
    eos = d.get("eos_token_id")
    if eos is not None and not _int(eos) and not (isinstance(eos, list) and all(_int(x) for x in eos)):
        raise bad("eos_token_id", "an integer or a list of integers")


# ---- a config against the file that carries it --------------------------------------------------------
def config_against_file(cfg, n_tensors: int, data_bytes: int, kind: str, source: str) -> None:
    """Refuse a config describing more tensors or more weight bytes than the file holds, before any
    loop over its layers or experts (a corrupt count would otherwise run away)."""
    L, E = cfg.num_hidden_layers, cfg.moe_num_primary_experts
    per_layer = 10 if kind == "gguf" else 7 + 3 * E
    need = L * per_layer + 2 + (0 if cfg.tie_word_embeddings else 1)
    if need > 2 * n_tensors + 16:   # a few missing: the assembly names the first one
        raise WeightError(f"{source}: the config describes {need} tensors ({L} layers, {E} experts) but the file "
                          f"holds {n_tensors}: corrupt config or missing weights")
    smallest = min(size / block for _, block, size in ggml_types().values())
    if cfg.parameter_count() * smallest > data_bytes:
        raise WeightError(f"{source}: the config describes {cfg.parameter_count():,} parameters, more than "
                          f"{data_bytes:,} bytes of weights can hold: corrupt config or truncated file")


def tensor_type(t, role: str) -> None:
    """A stored tensor's type against what the architecture expects of its role: norms hold floats
    element by element, no weight is an integer type, block types need rows of whole blocks."""
    fmt = t.fmt.lower()
    if fmt in INT_TYPES:
        raise WeightError(f"{t.source}: tensor '{t.name}' has integer type {fmt.upper()}; weights are float or "
                          "quantised")
    if len(t.shape) == 1 and fmt not in FLOAT_TYPES:
        raise WeightError(f"{t.source}: tensor '{t.name}' ({role}) is a 1-D norm but has type {fmt.upper()}; "
                          f"norms are {', '.join(x.upper() for x in FLOAT_TYPES)}")


# ---- safetensors -----------------------------------------------------------------------------------
#: bytes per element of every safetensors dtype
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json `object_pairs_hook`: a key given twice is an error, not "the last one wins"."""
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


def safetensors_header(path: Path, header: dict[str, Any], data_len: int) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, begin, end) after checking every entry's types and size, and that the
    entries cover the data region exactly, without holes or overlaps (the safetensors rule)."""
    out = {}
    for name, e in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(e, dict):
            raise WeightError(f"{where} has a malformed header entry {e!r}")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise WeightError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_int(x) and x >= 0 for x in shape):
            raise WeightError(f"{where} has a malformed shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(x) for x in offsets):
            raise WeightError(f"{where} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise WeightError(f"{where} has data_offsets {offsets} (begin after end)")
        if end > data_len:
            raise WeightError(f"{where} lies at bytes {begin}..{end} of the data region but the file holds only "
                              f"{data_len}: the file is truncated")
        need = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if end - begin != need:
            raise WeightError(f"{where} {dtype}{shape} needs {need} bytes, header says {end - begin}")
        out[name] = (dtype, shape, begin, end)
    pos = 0
    for name, (_, _, begin, end) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a hole of {begin - pos} bytes before it"
            raise WeightError(f"{path}: tensor '{name}' at bytes {begin}..{end} {what}")
        pos = end
    if pos != data_len:
        raise WeightError(f"{path}: {data_len - pos} bytes after the last tensor's data: corrupt header")
    return out


def shard_path(directory: Path, shard: Any, index: Path) -> Path:
    """A shard named in an index: a relative path that stays inside the model directory."""
    if not isinstance(shard, str) or not shard:
        raise WeightError(f"{index}: a 'weight_map' value must be a shard file name, got {shard!r}")
    norm = posixpath.normpath(shard.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or "\0" in norm:
        raise WeightError(f"{index}: shard {shard!r} lies outside the model directory {directory}")
    return directory / norm


# ---- tokenizers ----------------------------------------------------------------------------------
def gguf_tokenizer(meta: dict[str, Any], source: str) -> None:
    """The `tokenizer.ggml.*` arrays and ids: types, lengths, no duplicate tokens, ids in range."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{source}: metadata 'tokenizer.ggml.tokens' must be a non-empty list of strings")
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise TokenizerError(f"{source}: metadata 'tokenizer.ggml.tokens' holds {dup!r} twice")
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise TokenizerError(f"{source}: metadata 'tokenizer.ggml.merges' must be a list of 'left right' strings")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != len(tokens)
                              or not all(_int(t) for t in types)):
        raise TokenizerError(f"{source}: metadata 'tokenizer.ggml.token_type' must hold one integer per token "
                             f"({len(tokens)})")
    for key in ("bos", "eos", "eot", "eom", "padding"):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and (not _int(v) or not 0 <= v < len(tokens)):
            raise TokenizerError(f"{source}: metadata 'tokenizer.ggml.{key}_token_id' = {v!r} is not a token id "
                                 f"(0..{len(tokens) - 1})")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: metadata 'tokenizer.chat_template' must be a string")
