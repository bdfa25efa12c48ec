"""Mutation fuzzing of model files: mutators for GGUF files and HF directories, each tagged with what a
correct loader must do with the result, and an isolated runner that loads a mutant on the numpy and c
backends in a forked child (so a signal, a hang or a runaway allocation is caught, not suffered).

Used by tests/test_fuzz_files.py (hypothesis drives the mutators, a couple of minutes) and by
tests/fuzz_files.py (thousands of seeded mutants, figures per category and backend).

Expectations: "reject" (the mutant is not a valid file: loading must raise an st-sdk error naming the
file), "may_load" (it may be valid: if it loads, its logits must be finite and its tensor table
unchanged), "must_load" (only tensor data changed: a valid file whatever the numbers).
"""
from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# ---- an independent GGUF parser (byte spans of every field) -------------------------------------
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INT_VTYPES = (0, 1, 2, 3, 4, 5, 10, 11)


@dataclass
class KV:
    key: str
    start: int          # the key's length field
    type_off: int       # the value type field
    value_off: int
    end: int            # one past the value
    vtype: int
    etype: int | None = None   # arrays: element type
    n: int | None = None       # arrays: element count
    value: Any = None


@dataclass
class TensorInfo:
    name: str
    start: int          # the name's length field
    ndims_off: int
    dims_off: int
    type_off: int
    offset_off: int
    end: int
    dims: tuple[int, ...]
    ttype: int
    offset: int


@dataclass
class GGUFLayout:
    kvs: list[KV]
    tensors: list[TensorInfo]
    header_end: int
    data_start: int
    alignment: int
    size: int

    def kv(self, key: str) -> KV | None:
        return next((k for k in self.kvs if k.key == key), None)

    def tensor_table(self) -> list[tuple]:
        return [(t.name, t.dims, t.ttype, t.offset) for t in self.tensors]


def _str(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(data: bytes, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in SCALARS:
        f = "<" + SCALARS[vtype]
        return struct.unpack_from(f, data, pos)[0], pos + struct.calcsize(f)
    if vtype == 8:
        return _str(data, pos)
    etype, n = struct.unpack_from("<IQ", data, pos)
    pos += 12
    out = []
    for _ in range(n):
        v, pos = _value(data, pos, etype)
        out.append(v)
    return out, pos


def gguf_layout(data: bytes) -> GGUFLayout:
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos, kvs = 24, []
    for _ in range(n_kv):
        start = pos
        key, pos = _str(data, pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        type_off, pos = pos, pos + 4
        etype = n = None
        if vtype == 9:
            etype, n = struct.unpack_from("<IQ", data, pos)
        value, end = _value(data, pos, vtype)
        kvs.append(KV(key, start, type_off, pos, end, vtype, etype, n, value))
        pos = end
    tensors = []
    for _ in range(n_tensors):
        start = pos
        name, pos = _str(data, pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{nd}Q", data, pos + 4)
        dims_off = pos + 4
        type_off = dims_off + 8 * nd
        ttype, offset = struct.unpack_from("<IQ", data, type_off)
        tensors.append(TensorInfo(name, start, pos, dims_off, type_off, type_off + 4, type_off + 12, dims, ttype,
                                  offset))
        pos = type_off + 12
    align = next((k.value for k in kvs if k.key == "general.alignment"), 32)
    return GGUFLayout(kvs, tensors, pos, -(-pos // align) * align, align, len(data))


def ggml_sizes() -> dict[int, tuple[int, int]]:
    import gguf

    return {int(t): (int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}


# ---- what SmallThinker reads from GGUF metadata, and which values are valid ------------------------
ARCH = "smallthinker"
INT_KEYS = {"block_count": 1024, "embedding_length": 1 << 17, "attention.head_count": 1 << 12,
            "attention.head_count_kv": 1 << 12, "attention.key_length": 1 << 12, "expert_count": 1 << 14,
            "expert_used_count": 1 << 14, "expert_feed_forward_length": 1 << 18, "feed_forward_length": 1 << 18,
            "context_length": 1 << 24, "attention.sliding_window": 1 << 24}
FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon")


def gguf_value_valid(key: str, value: Any) -> bool:
    """Whether a metadata value is one a SmallThinker GGUF may hold (the oracle's own schema)."""
    short = key[len(ARCH) + 1:] if key.startswith(ARCH + ".") else None
    if short in INT_KEYS:
        v = value[0] if isinstance(value, list) and value and all(x == value[0] for x in value) else value
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= INT_KEYS[short]
    if short in FLOAT_KEYS:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if short == "expert_gating_func":
        return value in (1, 2) and not isinstance(value, bool)
    if key == "general.alignment":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0 and not value & (value - 1)
    if key == "general.architecture":
        return value == ARCH
    return True


# ---- mutation sources ----------------------------------------------------------------------------
class Draw:
    """Random choices for the mutators, from a numpy Generator (the script) or hypothesis (the test)."""

    def __init__(self, rng: np.random.Generator | None = None, hypothesis_data=None):
        self.rng, self.data = rng, hypothesis_data

    def integer(self, lo: int, hi: int) -> int:
        """lo..hi inclusive."""
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.integers(lo, hi))
        return int(self.rng.integers(lo, hi + 1)) if hi - lo < 2**63 - 1 else lo + int(self.rng.integers(0, 2**62))

    def choice(self, seq):
        return seq[self.integer(0, len(seq) - 1)]


#: integer values that break loaders: zero, one, sign and width boundaries
EDGE_INTS = (0, 1, 2, 3, 7, 31, 33, 255, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
             2**64 - 1)
EDGE_FLOATS = (0.0, -0.0, -1.0, 1e-45, 1e38, 3.4e38, float("inf"), float("-inf"), float("nan"), 1.5, 1e6)


@dataclass
class Mutant:
    category: str
    expect: str          # "reject" | "may_load" | "must_load"
    what: str            # a description for the report
    data: bytes | None = None                               # a GGUF file's bytes
    files: dict[str, bytes | None] = field(default_factory=dict)   # HF: file name -> new bytes (None: delete)
    new_table: bool = False   # a valid reading of the mutant has another tensor table (a same-size type swap)


def _pack_int(vtype: int, value: int) -> bytes:
    f = "<" + SCALARS[vtype]
    size = struct.calcsize(f)
    return (value % (1 << (8 * size))).to_bytes(size, "little")


def _patch(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


def gguf_mutant(base: bytes, lay: GGUFLayout, d: Draw) -> Mutant | None:
    """One mutation of a GGUF file; None when the drawn mutation is a no-op."""
    cat = d.choice(("count", "kv-int", "kv-float", "kv-type", "string-len", "array-len", "tensor-offset",
                    "tensor-type", "tensor-dims", "tensor-name", "alignment", "duplicate", "truncate",
                    "flip-header", "flip-data"))
    sizes = ggml_sizes()
    if cat == "count":
        which = d.choice((8, 16))
        old = struct.unpack_from("<Q", base, which)[0]
        new = d.choice((old - 1, old + 1, 0, old * 2, 2**31 - 1, 2**32, 2**63, 2**64 - 1)) % 2**64
        if new == old:
            return None
        return Mutant("gguf/count", "reject", f"{'n_tensors' if which == 8 else 'n_kv'} {old} -> {new}",
                      _patch(base, which, struct.pack("<Q", new)))
    if cat == "kv-int":
        kvs = [k for k in lay.kvs if k.vtype in INT_VTYPES]
        k = d.choice(kvs)
        new = d.choice(EDGE_INTS + (k.value - 1, k.value + 1, k.value * 2, -1))
        packed = _pack_int(k.vtype, new)
        new_v = struct.unpack("<" + SCALARS[k.vtype], packed)[0]
        if new_v == k.value:
            return None
        expect = "may_load" if gguf_value_valid(k.key, new_v) else "reject"
        return Mutant("gguf/kv-int", expect, f"{k.key} {k.value} -> {new_v}", _patch(base, k.value_off, packed))
    if cat == "kv-float":
        kvs = [k for k in lay.kvs if k.vtype in (6, 12)]
        if not kvs:
            return None
        k = d.choice(kvs)
        new = d.choice(EDGE_FLOATS + (k.value * 10, -k.value))
        packed = struct.pack("<" + SCALARS[k.vtype], new)
        new_v = struct.unpack("<" + SCALARS[k.vtype], packed)[0]
        if new_v == k.value or (math.isnan(new_v) and math.isnan(k.value)):
            return None
        expect = "may_load" if gguf_value_valid(k.key, new_v) else "reject"
        return Mutant("gguf/kv-float", expect, f"{k.key} {k.value} -> {new_v}", _patch(base, k.value_off, packed))
    if cat == "kv-type":
        k = d.choice(lay.kvs)
        new = d.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 255, 2**32 - 1))
        if new == k.vtype:
            return None
        data = _patch(base, k.type_off, struct.pack("<I", new))
        if k.vtype in SCALARS and new in SCALARS and struct.calcsize(SCALARS[k.vtype]) == struct.calcsize(SCALARS[new]):
            # same width: the same bytes read as another scalar type, judged by the value they now make
            value = struct.unpack_from("<" + SCALARS[new], base, k.value_off)[0]
            return Mutant("gguf/kv-type", "may_load" if gguf_value_valid(k.key, value) else "reject",
                          f"{k.key} type {k.vtype} -> {new} (value {value!r})", data)
        # another width: the parse goes off the rails (a key nothing reads may, by chance, survive)
        reads = k.key.startswith((ARCH + ".", "tokenizer.", "general.architecture"))
        return Mutant("gguf/kv-type", "reject" if reads else "may_load", f"{k.key} type {k.vtype} -> {new}", data)
    if cat == "string-len":
        spans = [(k.start, f"key {k.key}") for k in lay.kvs] + [(t.start, f"tensor name {t.name}") for t in lay.tensors]
        spans += [(k.value_off, f"value of {k.key}") for k in lay.kvs if k.vtype == 8]
        off, what = d.choice(spans)
        old = struct.unpack_from("<Q", base, off)[0]
        new = d.choice((old + 1, old - 1, 0, old + 8, 2**32, 2**63, 2**64 - 1, len(base))) % 2**64
        if new == old:
            return None
        return Mutant("gguf/string-len", "reject", f"length of {what} {old} -> {new}",
                      _patch(base, off, struct.pack("<Q", new)))
    if cat == "array-len":
        arrays = [k for k in lay.kvs if k.vtype == 9]
        k = d.choice(arrays)
        new = d.choice((k.n + 1, k.n - 1, 0, 2**31, 2**62, 2**64 - 1)) % 2**64
        if new == k.n:
            return None
        return Mutant("gguf/array-len", "reject", f"length of array {k.key} {k.n} -> {new}",
                      _patch(base, k.value_off + 4, struct.pack("<Q", new)))
    if cat == "tensor-offset":
        t = d.choice(lay.tensors)
        other = d.choice(lay.tensors)
        new = d.choice((t.offset + 1, t.offset + 4, t.offset - 1, t.offset + lay.alignment, other.offset,
                        t.offset - lay.alignment, 2**63, 2**64 - 1, t.offset + d.integer(1, 4096))) % 2**64
        if new == t.offset:
            return None
        return Mutant("gguf/tensor-offset", "reject", f"offset of {t.name} {t.offset} -> {new}",
                      _patch(base, t.offset_off, struct.pack("<Q", new)))
    if cat == "tensor-type":
        t = d.choice(lay.tensors)
        new = d.choice(sorted(sizes) + [31, 99, 2**32 - 1])
        if new == t.ttype:
            return None
        # a type of the same bytes per element whose blocks divide the rows (F16 <-> BF16, Q4_0 <-> IQ4_NL,
        # Q4_0's 18 bytes per 32 <-> NVFP4's 36 per 64) leaves a valid file holding other numbers, unless it
        # is an integer type (never a weight)
        (b0, s0), (b1, s1) = sizes[t.ttype], sizes.get(new, (1, 0))
        same_size = new in sizes and s1 * b0 == s0 * b1 and t.dims[0] % b1 == 0 and new not in (24, 25, 26, 27)
        return Mutant("gguf/tensor-type", "may_load" if same_size else "reject",
                      f"type of {t.name} {t.ttype} -> {new}", _patch(base, t.type_off, struct.pack("<I", new)),
                      new_table=same_size)
    if cat == "tensor-dims":
        t = d.choice(lay.tensors)
        if d.integer(0, 3) == 0:
            new_nd = d.choice((0, len(t.dims) + 1, len(t.dims) - 1, 5, 2**32 - 1))
            if new_nd == len(t.dims):
                return None
            return Mutant("gguf/tensor-dims", "reject", f"n_dims of {t.name} {len(t.dims)} -> {new_nd}",
                          _patch(base, t.ndims_off, struct.pack("<I", new_nd)))
        j = d.integer(0, len(t.dims) - 1)
        old = t.dims[j]
        new = d.choice((0, 1, old + 1, old - 1, old * 2, old // 2, 2**31, 2**32 + old, 2**62, 2**64 - 1)) % 2**64
        if new == old:
            return None
        return Mutant("gguf/tensor-dims", "reject", f"dim {j} of {t.name} {old} -> {new}",
                      _patch(base, t.dims_off + 8 * j, struct.pack("<Q", new)))
    if cat == "tensor-name":
        t = d.choice(lay.tensors)
        same_len = [o for o in lay.tensors if len(o.name) == len(t.name) and o.name != t.name]
        if same_len and d.integer(0, 1):
            o = d.choice(same_len)
            return Mutant("gguf/tensor-name", "reject", f"tensor {t.name} renamed to {o.name} (a duplicate)",
                          _patch(base, t.start + 8, o.name.encode()))
        i = d.integer(0, len(t.name) - 1)
        new = bytes([d.choice(b"abcxyz019._")])
        if new == t.name.encode()[i:i + 1]:
            return None
        return Mutant("gguf/tensor-name", "reject", f"tensor {t.name} byte {i} -> {new!r}",
                      _patch(base, t.start + 8 + i, new))
    if cat == "alignment":
        new = d.choice((0, 1, 3, 8, 16, 24, 64, 4096, 2**31, 2**32 - 1))
        key = b"general.alignment"
        kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 4) + struct.pack("<I", new)
        at = lay.kvs[-1].end
        n_kv = struct.unpack_from("<Q", base, 16)[0]
        head = base[:16] + struct.pack("<Q", n_kv + 1) + base[24:at] + kv + base[at:lay.header_end]
        # the data stays where it was for alignment 32 (a file whose key lies), or moves to the new one
        honest = bool(d.integer(0, 1) and new and not new & (new - 1))
        align = new if honest else 32
        start = -(-len(head) // align) * align if align else len(head)
        data = head + b"\0" * (start - len(head)) + base[lay.data_start:]
        # valid when the data moved to the new alignment and the tensors are packed by its rule
        pos, packed = 0, honest
        for t in lay.tensors:
            packed = packed and t.offset == pos
            pos = t.offset + -(-_nbytes(t, sizes) // align) * align
        expect = "may_load" if packed and start + pos >= len(data) else "reject"
        return Mutant("gguf/alignment", expect, f"general.alignment = {new} ({'data moved' if honest else 'data left'})",
                      data)
    if cat == "duplicate":
        if d.integer(0, 1):
            k = d.choice(lay.kvs)
            at = lay.kvs[-1].end
            n_kv = struct.unpack_from("<Q", base, 16)[0]
            data = base[:16] + struct.pack("<Q", n_kv + 1) + base[24:at] + base[k.start:k.end] + base[at:lay.header_end]
            what = f"metadata key {k.key} twice"
        else:
            t = d.choice(lay.tensors)
            data = base[:8] + struct.pack("<Q", len(lay.tensors) + 1) + base[16:lay.header_end] + base[t.start:t.end]
            what = f"tensor {t.name} listed twice"
        start = -(-len(data) // lay.alignment) * lay.alignment
        return Mutant("gguf/duplicate", "reject", what, data + b"\0" * (start - len(data)) + base[lay.data_start:])
    if cat == "truncate":
        last_end = max(t.offset + _nbytes(t, sizes) for t in lay.tensors) + lay.data_start
        cut = d.choice((d.integer(0, lay.header_end), d.integer(lay.header_end, len(base) - 1),
                        len(base) - 1, last_end - 1, lay.data_start))
        if cut >= len(base):
            return None
        return Mutant("gguf/truncate", "reject" if cut < last_end else "may_load", f"cut at {cut} of {len(base)}",
                      base[:cut])
    if cat == "flip-header":
        i = d.integer(24, lay.header_end - 1)
        bit = d.integer(0, 7)
        data = _patch(base, i, bytes([base[i] ^ (1 << bit)]))
        in_tensors = i >= (lay.tensors[0].start if lay.tensors else lay.header_end)
        return Mutant("gguf/flip-header", "reject" if in_tensors else "may_load",
                      f"bit {bit} of byte {i} ({'tensor infos' if in_tensors else 'metadata'})", data)
    # flip-data
    i = d.integer(lay.data_start, len(base) - 1)
    bit = d.integer(0, 7)
    return Mutant("gguf/flip-data", "must_load", f"bit {bit} of data byte {i}",
                  _patch(base, i, bytes([base[i] ^ (1 << bit)])))


def _nbytes(t: TensorInfo, sizes) -> int:
    b, s = sizes[t.ttype]
    return math.prod(t.dims) // b * s


# ---- HF directories -----------------------------------------------------------------------------
#: config.json fields SmallThinker reads -> what a valid value is
HF_INTS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "num_hidden_layers": 1024, "num_attention_heads": 1 << 12,
           "num_key_value_heads": 1 << 12, "head_dim": 1 << 12, "moe_num_primary_experts": 1 << 14,
           "moe_num_active_primary_experts": 1 << 14, "moe_ffn_hidden_size": 1 << 18,
           "max_position_embeddings": 1 << 24, "sliding_window_size": 1 << 24}
HF_BOOLS = ("tie_word_embeddings", "moe_primary_router_apply_softmax")
HF_FLOATS = ("rope_theta", "rms_norm_eps")
HF_VALUES = (True, False, 0, 1, -1, 2, 1.5, 8.0, 2**31 - 1, 2**63, 10**9, "abc", "", None, [], [1], {}, float("nan"),
             float("inf"), float("-inf"), 1e308, 1e-300)


def hf_value_valid(name: str, value: Any, cfg: dict) -> bool:
    """Whether a config.json value is one a SmallThinker config may hold (the oracle's own schema)."""
    if name in HF_INTS:
        if value is None and name in ("head_dim", "sliding_window_size", "num_key_value_heads"):
            return name != "num_key_value_heads"
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= HF_INTS[name]
    if name in HF_BOOLS:
        return isinstance(value, bool) or value is None
    if name in HF_FLOATS:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and math.isfinite(value) and value > 0)
    if name == "architectures":
        return isinstance(value, list) and value[:1] == ["SmallThinkerForCausalLM"] and all(isinstance(a, str) for a in value)
    if name in ("rope_layout", "sliding_window_layout"):
        return value is None or (isinstance(value, list) and len(value) == cfg.get("num_hidden_layers")
                                 and all(x in (0, 1) and not isinstance(x, bool) for x in value))
    if name == "bos_token_id":
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < cfg["vocab_size"])
    if name == "eos_token_id":
        vals = value if isinstance(value, list) else [value]
        return value is None or all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < cfg["vocab_size"]
                                    for x in vals)
    return True


def _dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def safetensors_table(blob: bytes) -> dict | None:
    """The tensor entries of a safetensors file, parsed independently (None when unparsable)."""
    try:
        (n,) = struct.unpack_from("<Q", blob, 0)
        h = json.loads(blob[8:8 + n])
        h.pop("__metadata__", None)
        return h
    except Exception:
        return None


def hf_mutant(base: dict[str, bytes], d: Draw) -> Mutant | None:
    """One mutation of an HF directory given as {file name: bytes}; None for a no-op."""
    sharded = "model.safetensors.index.json" in base
    cats = ["config-field", "config-drop", "config-json", "st-entry", "st-duplicate", "st-header-len", "st-truncate",
            "st-flip-header", "st-flip-data", "tokenizer", "tokenizer-config", "generation-config"]
    if sharded:
        cats.append("index")
    cat = d.choice(cats)
    cfg = json.loads(base["config.json"])
    shards = sorted(n for n in base if n.endswith(".safetensors"))
    if cat == "config-field":
        name = d.choice(sorted(cfg))
        new = d.choice(HF_VALUES + ((cfg[name] + 1,) if isinstance(cfg[name], int) and not isinstance(cfg[name], bool) else ())
                       + (([1 - x for x in cfg[name]], cfg[name][:-1]) if isinstance(cfg[name], list) and
                          all(x in (0, 1) for x in cfg[name]) else ()))
        if json.dumps(new) == json.dumps(cfg[name]) and type(new) is type(cfg[name]):
            return None
        mutated = dict(cfg, **{name: new})
        return Mutant("hf/config-field", "may_load" if hf_value_valid(name, new, mutated) else "reject",
                      f"config.json {name}: {cfg[name]!r} -> {new!r}", files={"config.json": _dumps(mutated)})
    if cat == "config-drop":
        name = d.choice(sorted(cfg))
        mutated = {k: v for k, v in cfg.items() if k != name}
        required = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "moe_num_primary_experts", "moe_num_active_primary_experts", "moe_ffn_hidden_size")
        return Mutant("hf/config-drop", "reject" if name in required else "may_load", f"config.json without {name}",
                      files={"config.json": _dumps(mutated)})
    if cat == "config-json":
        raw = base["config.json"]
        choice = d.integer(0, 3)
        new = (raw[:d.integer(0, len(raw) - 1)], b"[" * 100000, b"null", b'"text"')[choice]
        return Mutant("hf/config-json", "reject", f"config.json replaced ({('cut', 'deep nesting', 'null', 'string')[choice]})",
                      files={"config.json": new})
    shard = d.choice(shards)
    blob = base[shard]
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    if cat == "st-entry":
        t = d.choice(names)
        e = dict(header[t])
        field_ = d.choice(("dtype", "shape", "data_offsets"))
        if field_ == "dtype":
            e["dtype"] = d.choice(("F16", "BF16", "F64", "I32", "U8", "F8_E4M3", "X99", 5, None))
        elif field_ == "shape":
            s = list(e["shape"])
            e["shape"] = d.choice((s[::-1], s + [1], s[:-1], [x * 2 for x in s], [-1] + s[1:], [1.5] * len(s),
                                   [2**63] * len(s), "64", None, [True] * len(s)))
        else:
            b, en = e["data_offsets"]
            other = header[d.choice(names)]["data_offsets"]
            e["data_offsets"] = d.choice(([b + 1, en + 1], [b, en + 2], [float(b), float(en)], other, [en, b],
                                          [b - 2**63, en], [b, en, 0], [str(b), str(en)], None, [b + 4, en + 4]))
        if e == header[t]:
            return None
        new_h = dict(header, **{t: e})
        # an entry changed: only a dtype of the same width over the same bytes keeps a valid file
        same_width = field_ == "dtype" and {e["dtype"], header[t]["dtype"]} <= {"F16", "BF16"}
        return Mutant("hf/st-entry", "may_load" if same_width else "reject",
                      f"{shard} {t} {field_}: {header[t][field_]!r} -> {e[field_]!r}",
                      files={shard: _with_header(blob, n, new_h)}, new_table=same_width)
    if cat == "st-duplicate":
        t = d.choice(names)
        text = json.dumps(header, separators=(",", ":"))
        dup = json.dumps({t: header[t]}, separators=(",", ":"))[1:-1]
        new_text = text[:-1] + "," + dup + "}"
        return Mutant("hf/st-duplicate", "reject", f"{shard} lists {t} twice",
                      files={shard: _with_header(blob, n, None, new_text.encode())})
    if cat == "st-header-len":
        new = d.choice((n + 1, n - 1, 0, 2**63, len(blob), 2**64 - 1, n + 8))
        if new == n:
            return None
        return Mutant("hf/st-header-len", "reject", f"{shard} header length {n} -> {new}",
                      files={shard: struct.pack("<Q", new) + blob[8:]})
    if cat == "st-truncate":
        cut = d.choice((d.integer(0, 8 + n), d.integer(8 + n, len(blob) - 1), len(blob) - 1))
        return Mutant("hf/st-truncate", "reject", f"{shard} cut at {cut} of {len(blob)}", files={shard: blob[:cut]})
    if cat == "st-flip-header":
        i = d.integer(8, 8 + n - 1)
        bit = d.integer(0, 7)
        return Mutant("hf/st-flip-header", "may_load", f"{shard} header bit {bit} of byte {i}",
                      files={shard: _patch(blob, i, bytes([blob[i] ^ (1 << bit)]))})
    if cat == "st-flip-data":
        i = d.integer(8 + n, len(blob) - 1)
        bit = d.integer(0, 7)
        return Mutant("hf/st-flip-data", "must_load", f"{shard} data bit {bit} of byte {i}",
                      files={shard: _patch(blob, i, bytes([blob[i] ^ (1 << bit)]))})
    if cat == "index":
        index = json.loads(base["model.safetensors.index.json"])
        wm = index["weight_map"]
        t = d.choice(sorted(wm))
        new = d.choice(("../" + wm[t], "/etc/passwd", 5, None, ["x"], "", "missing.safetensors", "./" + wm[t],
                        "sub/../" + wm[t], "..", wm[t] + "\0"))
        if new == wm[t]:
            return None
        stays = isinstance(new, str) and new.replace("sub/../", "").replace("./", "") == wm[t]
        index = dict(index, weight_map=dict(wm, **{t: new}))
        return Mutant("hf/index", "may_load" if stays else "reject", f"weight_map[{t}]: {wm[t]!r} -> {new!r}",
                      files={"model.safetensors.index.json": _dumps(index)})
    if cat == "tokenizer":
        tok = json.loads(base["tokenizer.json"])
        vocab = tok["model"]["vocab"]
        how = d.integer(0, 4)
        if how == 0:   # two tokens with one id
            a, b = d.choice(sorted(vocab)), d.choice(sorted(vocab))
            vocab[a] = vocab[b]
        elif how == 1:
            tok["model"]["merges"] = tok["model"]["merges"][: d.integer(0, 10)] + [["zz", "qq"]]
        elif how == 2:
            tok["model"]["vocab"] = {k: v + 10**6 for k, v in vocab.items()}
        elif how == 3:
            tok["added_tokens"] = [{"id": "x"}]
        else:
            return Mutant("hf/tokenizer", "reject", "tokenizer.json cut",
                          files={"tokenizer.json": base["tokenizer.json"][: d.integer(0, len(base["tokenizer.json"]) - 1)]})
        return Mutant("hf/tokenizer", "may_load", f"tokenizer.json edit {how}", files={"tokenizer.json": _dumps(tok)})
    if cat == "tokenizer-config":
        tcfg = json.loads(base["tokenizer_config.json"])
        key = d.choice(("chat_template", "eos_token", "bos_token", "pad_token"))
        new = d.choice((5, None, [], [{"name": ["x"], "template": 3}], {"content": 7}, "{% for %}", "<|im_end|>", True))
        tcfg[key] = new
        return Mutant("hf/tokenizer-config", "may_load", f"tokenizer_config.json {key} -> {new!r}",
                      files={"tokenizer_config.json": _dumps(tcfg)})
    gen = json.loads(base.get("generation_config.json", b"{}"))
    gen["eos_token_id"] = d.choice((None, "x", [1.5], 10**12, [True], -1, {}))
    return Mutant("hf/generation-config", "may_load", f"generation_config.json eos_token_id -> {gen['eos_token_id']!r}",
                  files={"generation_config.json": _dumps(gen)})


def _with_header(blob: bytes, n: int, header: dict | None, text: bytes | None = None) -> bytes:
    """The safetensors file with a new header; the data region is kept (the header is padded to 8)."""
    text = text if text is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


# ---- running a mutant --------------------------------------------------------------------------
IDS = [3, 17, 256, 99, 400, 12, 7, 311]


def _vm_size() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_and_run(path: str, backends: tuple[str, ...], emit: Callable[[dict], None]) -> None:
    """In the child: load on each backend, compute logits, generate three tokens; one report per backend."""
    import st_sdk
    from st_sdk.errors import STError

    for b in backends:
        rep: dict[str, Any] = {"backend": b}
        try:
            m = st_sdk.load(path, backend=b)
            vocab, ctx = m.config.vocab_size, m.config.max_position_embeddings
            ids = [i % vocab for i in IDS][:max(1, ctx - 1)]
            logits = m.logits(ids)
            rep["finite"] = bool(np.isfinite(logits).all())
            rep["logits"] = logits[-1].astype(float).round(4).tolist()[:64]
            prompt = "Hello" if m.tokenizer is not None else ids
            try:
                r = m.generate(prompt, max_new_tokens=3, temperature=0)
                rep["generated"] = list(r.token_ids)
            except STError as e:
                rep["generate_error"] = f"{type(e).__name__}: {e}"[:300]
            rep["outcome"] = "loaded"
        except STError as e:
            rep.update(outcome="rejected", error=f"{type(e).__name__}: {e}"[:500])
        except BaseException as e:   # the failures this fuzzing looks for
            rep.update(outcome="raw", error=f"{type(e).__name__}: {e}"[:500],
                       trace=traceback.format_exc()[-1500:])
        emit(rep)


def run_isolated(path: str, backends: tuple[str, ...] = ("numpy", "c"), timeout: float = 60.0,
                 memory: int = 3 << 30) -> list[dict]:
    """Load `path` in a forked child (address space limited to what it has plus `memory`); one report per
    backend: outcome "loaded" | "rejected" | "raw" | "signal" | "hang"."""
    import resource

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        code = 0
        try:
            os.close(r)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            limit = _vm_size() + memory
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

            def emit(rep):
                os.write(w, (json.dumps(rep) + "\n").encode())

            load_and_run(path, backends, emit)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    buf, deadline, timed_out = b"", time.monotonic() + timeout, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    reports = [json.loads(line) for line in buf.decode().splitlines() if line.strip()]
    done = {rep["backend"] for rep in reports}
    for b in backends:
        if b in done:
            continue
        if timed_out:
            reports.append({"backend": b, "outcome": "hang", "error": f"no answer within {timeout:.0f} s"})
        elif os.WIFSIGNALED(status):
            reports.append({"backend": b, "outcome": "signal", "error": signal.Signals(os.WTERMSIG(status)).name})
        else:
            reports.append({"backend": b, "outcome": "raw", "error": f"child exited {os.WEXITSTATUS(status)} without a report"})
        break   # the backends after the one that died were never tried
    return reports


# ---- judging -------------------------------------------------------------------------------------
def write_mutant(m: Mutant, base_path: Path, out: Path) -> Path:
    """The mutant on disk under `out` (a fresh file or directory); returns what to load."""
    out.mkdir(parents=True, exist_ok=True)
    if m.data is not None:
        p = out / base_path.name
        p.write_bytes(m.data)
        return p
    d = out / base_path.name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for f in base_path.iterdir():
        if f.is_file() and f.suffix != ".gguf" and f.name not in m.files:
            os.link(f, d / f.name) if _same_fs(f, d) else shutil.copy(f, d / f.name)
    for name, blob in m.files.items():
        if blob is not None:
            (d / name).write_bytes(blob)
    return d


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def structure_unchanged(m: Mutant, base: Any) -> bool:
    """Whether a loaded mutant's tensor table (parsed independently) and the config values the model
    reads are ones a valid file may hold: its tensor table equals the original's."""
    if m.data is not None:
        try:
            lay = gguf_layout(m.data)
        except Exception:
            return False
        if lay.tensor_table() != base.tensor_table() and not m.new_table:
            return False
        return all(gguf_value_valid(k.key, k.value) for k in lay.kvs)
    for name, blob in m.files.items():
        if name.endswith(".safetensors") and blob is not None and not m.new_table:
            if safetensors_table(blob) != safetensors_table(base[name]):
                return False
        if name == "config.json":
            try:
                cfg = json.loads(blob)
            except Exception:
                return False
            if not isinstance(cfg, dict) or not all(hf_value_valid(k, v, cfg) for k, v in cfg.items()):
                return False
    return True


def judge(m: Mutant, reports: list[dict], path: Path, base: Any) -> list[tuple[str, str]]:
    """(backend, verdict) per report: "ok-rejected", "ok-loaded", or a failure: "signal", "hang", "raw",
    "invalid-loaded" (a file that is not valid loaded), "nonfinite" (a loaded file that should be valid
    gave non-finite logits), "unnamed" (an error that does not name the file), "valid-rejected"."""
    out = []
    for rep in reports:
        o = rep["outcome"]
        if o in ("signal", "hang", "raw"):
            out.append((rep["backend"], o))
        elif o == "rejected":
            named = path.name in rep["error"] or str(path) in rep["error"]
            out.append((rep["backend"], "ok-rejected" if named else "unnamed"))
            if m.expect == "must_load":
                out[-1] = (rep["backend"], "valid-rejected")
        elif m.expect == "reject" or (m.expect == "may_load" and not structure_unchanged(m, base)):
            out.append((rep["backend"], "invalid-loaded"))
        elif not rep.get("finite", True) and m.expect != "must_load" and not m.new_table:
            out.append((rep["backend"], "nonfinite"))
        else:
            out.append((rep["backend"], "ok-loaded"))
    return out


FAILURES = ("signal", "hang", "raw", "invalid-loaded", "nonfinite", "unnamed")


# ---- campaigns -----------------------------------------------------------------------------------
#: the files mutants are made from: tiny models (4 hybrid layers, 8 experts) in every stored format
BASES = (("gguf", "f32", 1), ("gguf", "f16", 1), ("gguf", "q8_0", 1), ("gguf", "q4_0", 1),
         ("hf", "f32", 1), ("hf", "bf16", 2))


class Bases(list):
    """The base models (a list that prints short: hypothesis shows it in a falsifying example)."""

    def __repr__(self) -> str:
        return f"<{len(self)} fuzz bases: {', '.join(p.name for _, p, _, _ in self)}>"


def write_bases(root: Path, bases=BASES) -> Bases:
    """[(kind, path, bytes or {file: bytes}, layout or the same dict)] for each base model."""
    from st_sdk.synth import write_model

    out = []
    for kind, dtype, shards in bases:
        d = root / f"{kind}-{dtype}"
        if kind == "gguf":
            path = write_model(d, formats="gguf", dtype=dtype)["gguf"]
            data = path.read_bytes()
            out.append((kind, path, data, gguf_layout(data)))
        else:
            path = write_model(d, formats="hf", dtype=dtype, shards=shards)["hf"]
            files = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}
            out.append((kind, path, files, files))
    return Bases(out)


def warm(bases) -> None:
    """Import and initialise in this process what every child needs (plugins, hardware probe, smoke
    verdicts, the tokenizer library), so each forked child starts ready: about 4x faster per mutant."""
    import st_sdk

    path = next(p for kind, p, _, _ in bases if kind == "gguf")
    for backend in ("numpy", "c"):
        st_sdk.load(path, backend=backend).generate("Hello", max_new_tokens=1)


def draw_case(bases, d: Draw) -> tuple[Mutant, Path, Any] | None:
    """A base and a mutation of it: (mutant, the base's path, its layout or files); None for a no-op."""
    kind, path, blob, base = bases[d.integer(0, len(bases) - 1)]
    m = gguf_mutant(blob, base, d) if kind == "gguf" else hf_mutant(blob, d)
    return None if m is None else (m, path, base)


def run_case(case, out: Path, timeout: float = 60.0) -> tuple[list[tuple[str, str]], list[dict]]:
    """Write the mutant under `out`, load it in a child: (verdicts, reports)."""
    m, path, base = case
    target = write_mutant(m, path, out)
    reports = run_isolated(str(target), timeout=timeout)
    return judge(m, reports, target, base), reports
