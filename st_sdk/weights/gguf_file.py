"""GGUF files (llama.cpp architecture `smallthinker`): config and tokenizer from the metadata, tensors
memory-mapped (quantised ones stay quantised); and a streaming writer over `gguf.GGUFWriter`."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GGUF_ARCH, ModelConfig
from ..errors import ConfigError, STError, WeightError
from . import validate
from .tensor import FORMATS, QUANT_SIZES, STORAGE_DTYPE, WeightTensor, storage_shape
from .watch import WatchedFile

#: our format -> GGMLQuantizationType name (gguf's type names in lower case are our format names)
GGML_TYPES = {f: f.upper() for f in FORMATS}
#: llama.cpp's llama_ftype (general.file_type) for a file whose matrices are mostly `fmt`, or for one
#: of llama.cpp's mixes (q4_k_m...); a block type without an entry writes 1024 (llama.cpp: "guessed")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
              "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
              "q6_k": 18, "iq2_xxs": 19, "iq2_xs": 20, "q2_k_s": 21, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25,
              "iq3_s": 26, "iq2_s": 28, "iq4_xs": 30, "iq1_m": 31, "bf16": 32, "tq1_0": 36, "tq2_0": 37,
              "mxfp4": 38, "nvfp4": 39, "q3_k": 12, "q4_k": 15, "q5_k": 17}
FILE_TYPE_GUESSED = 1024
#: expert_gating_func values (llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_*)
GATING_SOFTMAX, GATING_SIGMOID = 1, 2


class GGUFModelFile:
    """An opened GGUF file: `config()`, `metadata(prefix)`, `get(name)`.

    The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per array
    element: ~17 s for a 151,936-token vocabulary against ~0.3 s here. Tensor data is one np.memmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightError(f"{self.path}: GGUF file not found")
        try:
            self._parse()
        except STError as e:
            if str(self.path) in str(e):
                raise
            raise type(e)(f"{self.path}: {e}") from None
        except Exception as e:   # struct.error, UnicodeDecodeError, IndexError... on damaged files
            raise WeightError(f"{self.path}: not a valid GGUF file or truncated ({type(e).__name__}: {e})") from None

    def _parse(self) -> None:
        self.watched = WatchedFile(self.path)   # the file's identity when mapped: see Model.check_files
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self.map)
        size = len(buf)
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF":
            raise WeightError(f"{self.path}: not a GGUF file (magic {bytes(magic)!r})")
        if version not in (2, 3):
            raise WeightError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        validate.gguf_counts(self.path, size, n_tensors, n_kv)
        pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _read_str(buf, pos)
            if key in self.fields:
                raise WeightError(f"metadata key '{key}' appears twice")
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            self.fields[key], pos = _read_value(buf, pos, vtype)
        infos = []
        for _ in range(n_tensors):
            name, pos = _read_str(buf, pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            if not 1 <= n_dims <= validate.GGML_MAX_DIMS:
                raise WeightError(f"tensor '{name}' has {n_dims} dimensions (1 to {validate.GGML_MAX_DIMS} allowed)")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, dims, ttype, offset))
        align = validate.gguf_alignment(self.path, self.fields)
        start = -(-pos // align) * align
        # name -> (ggml type name, numpy shape, absolute offset, bytes), every entry checked
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = \
            validate.gguf_tensor_table(self.path, infos, align, start, size)

    # ---- metadata ----------------------------------------------------------------------------
    def value(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def metadata(self, prefix: str = "") -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if k.startswith(prefix)}

    def config(self) -> ModelConfig:
        try:
            return self._config()
        except STError:
            raise
        except (TypeError, ValueError) as e:   # a key of the wrong type
            raise ConfigError(f"{self.path}: malformed metadata: {e}") from None

    def _config(self) -> ModelConfig:
        src = str(self.path)
        arch = self.value("general.architecture")
        if arch != GGUF_ARCH:
            raise ConfigError(f"{src}: unsupported architecture {arch!r} (metadata 'general.architecture'); "
                              f"st-sdk runs {GGUF_ARCH!r}")
        validate.gguf_metadata(self.path, self.fields, arch)

        def key(name: str, default: Any = KeyError):
            v = self.value(f"{arch}.{name}", None)
            if isinstance(v, list):   # per-layer arrays (head_count_kv): SmallThinker uses one value
                v = v[0] if v else None
            if v is None:
                if default is KeyError:
                    raise ConfigError(f"{src}: missing metadata key '{arch}.{name}'")
                return default
            return v

        L = int(key("block_count"))
        H = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        swa = key("attention.sliding_window", None)
        # GGUF stores no per-layer layout: llama.cpp's rule (docs/model.md)
        hybrid = tuple(0 if i % 4 == 0 else 1 for i in range(L))
        tokens = self.value("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        elif "token_embd.weight" in self.tensors:
            vocab = int(self.tensors["token_embd.weight"][1][0])
        else:
            raise ConfigError(f"{src}: cannot tell the vocabulary size (no token list, no token_embd.weight)")
        gating = int(key("expert_gating_func", GATING_SIGMOID))
        eos = [self.value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
        return ModelConfig(
            vocab_size=vocab, hidden_size=H, num_hidden_layers=L, num_attention_heads=n_heads,
            num_key_value_heads=int(key("attention.head_count_kv", n_heads)),
            head_dim=int(key("attention.key_length", H // n_heads if n_heads else 0)),
            moe_num_primary_experts=int(key("expert_count")),
            moe_num_active_primary_experts=int(key("expert_used_count")),
            moe_ffn_hidden_size=int(key("expert_feed_forward_length", None) or key("feed_forward_length")),
            rope_layout=hybrid if swa else (1,) * L,
            sliding_window_layout=hybrid if swa else (0,) * L,
            sliding_window_size=int(swa) if swa else 4096,
            moe_primary_router_apply_softmax=gating == GATING_SOFTMAX,
            rope_theta=_f32(key("rope.freq_base", 1.5e6)),
            rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in self.tensors,
            max_position_embeddings=int(key("context_length", 32768)),
            bos_token_id=self.value("tokenizer.ggml.bos_token_id"),
            eos_token_id=tuple(dict.fromkeys(int(e) for e in eos if e is not None and 0 <= e < vocab)),
            source=src)

    # ---- tensors ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> WeightTensor:
        info = self.tensors.get(name)
        if info is None:
            raise WeightError(f"{self.path}: tensor '{name}' is missing from the file")
        tname, shape, offset, nbytes = info
        fmt = tname.lower()
        if fmt not in FORMATS:
            raise WeightError(f"{self.path}: tensor '{name}' has unsupported type {tname}; "
                              f"supported: {', '.join(GGML_TYPES.values())}")
        data = self.map[offset:offset + nbytes].view(STORAGE_DTYPE[fmt]).reshape(storage_shape(fmt, shape))
        return WeightTensor(name, fmt, shape, data, str(self.path))

    def file_size(self) -> int:
        return self.path.stat().st_size

    def file_type(self) -> str | None:
        """general.file_type as llama.cpp names it ('q4_k_m', 'q8_0'...), or None when absent."""
        v = self.value("general.file_type")
        if not isinstance(v, int):
            return None
        names = {}
        for name, code in FILE_TYPES.items():
            names.setdefault(code, name)
        return names.get(v, "guessed" if v == FILE_TYPE_GUESSED else f"llama_ftype {v}")


#: GGUF metadata value types: id -> struct format (8 string, 9 array handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_str(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise WeightError("string runs past the end of the file")
    return str(buf[pos + 8:end], "utf-8"), end


def _read_value(buf, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALARS:
        f = "<" + _SCALARS[vtype]
        return struct.unpack_from(f, buf, pos)[0], pos + struct.calcsize(f)
    if vtype == 8:
        return _read_str(buf, pos)
    if vtype == 9:
        etype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype == 9:
            raise WeightError("arrays of arrays are not supported in GGUF metadata")
        validate.gguf_array_length(n, struct.calcsize("<" + _SCALARS[etype]) if etype in _SCALARS else 8, pos, len(buf))
        if etype in _SCALARS:   # numeric arrays in one go
            item = struct.calcsize("<" + _SCALARS[etype])
            if pos + n * item > len(buf):
                raise WeightError("array runs past the end of the file")
            arr = np.frombuffer(buf, dtype=np.dtype("<" + _SCALARS[etype]), count=n, offset=pos)
            return arr.tolist(), pos + n * item
        out = []
        for _ in range(n):
            v, pos = _read_value(buf, pos, etype)
            out.append(v)
        return out, pos
    raise WeightError(f"unknown metadata value type {vtype}")


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(v)))


# ---- writing ---------------------------------------------------------------------------------------
def layout_is_gguf_expressible(cfg: ModelConfig) -> bool:
    L = cfg.num_hidden_layers
    hybrid = tuple(0 if i % 4 == 0 else 1 for i in range(L))
    plain = ((1,) * L, (0,) * L)
    return (cfg.rope_layout, cfg.sliding_window_layout) in ((hybrid, hybrid), plain)


def model_metadata(cfg: ModelConfig, file_type: str, name: str = "SmallThinker") -> dict[str, Any]:
    """Every `smallthinker.*` key llama.cpp reads (the keys convert_hf_to_gguf.py writes)."""
    if not layout_is_gguf_expressible(cfg):
        raise WeightError(f"{cfg.source}: GGUF cannot store this layer layout (rope_layout "
                          f"{list(cfg.rope_layout)}, sliding_window_layout {list(cfg.sliding_window_layout)}): "
                          "llama.cpp assumes NoPE+global every 4th layer when a sliding window is set, "
                          "RoPE+global everywhere otherwise")
    a = GGUF_ARCH
    m: dict[str, Any] = {
        "general.name": name,
        f"{a}.context_length": cfg.max_position_embeddings,
        f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.block_count": cfg.num_hidden_layers,
        f"{a}.feed_forward_length": cfg.moe_ffn_hidden_size,
        f"{a}.attention.head_count": cfg.num_attention_heads,
        f"{a}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
        f"{a}.rope.dimension_count": cfg.head_dim,
        f"{a}.rope.freq_base": float(cfg.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{a}.expert_count": cfg.moe_num_primary_experts,
        f"{a}.expert_used_count": cfg.moe_num_active_primary_experts,
        f"{a}.expert_feed_forward_length": cfg.moe_ffn_hidden_size,
        f"{a}.expert_gating_func": GATING_SOFTMAX if cfg.moe_primary_router_apply_softmax else GATING_SIGMOID,
        "general.file_type": FILE_TYPES.get(file_type, FILE_TYPE_GUESSED),
        "general.quantization_version": 2,
    }
    if any(cfg.sliding_window_layout):
        m[f"{a}.attention.sliding_window"] = cfg.sliding_window_size
    return m


def _add_kv(writer, key: str, value: Any) -> None:
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], str):
            writer.add_array(key, list(value))
        else:
            writer.add_key_value(key, [int(v) for v in value], T.ARRAY, sub_type=T.INT32)
    else:
        raise TypeError(f"cannot write metadata {key}={value!r}")


class GGUFWriterStream:
    """Stream a GGUF file. Every tensor is declared up front (GGUF name -> (fmt, numpy shape)) so the
    header is written first; `write(name, expert, storage)` then takes data in any order, an expert
    index writing one slice of a stacked [E, ...] tensor. Only one chunk is ever in memory."""

    def __init__(self, path: str | Path, metadata: dict[str, Any], specs: dict[str, tuple[str, tuple[int, ...]]]):
        import gguf

        self.path = Path(path)
        self.specs = specs
        self.writer = writer = gguf.GGUFWriter(self.path, GGUF_ARCH)
        for k, v in metadata.items():
            if k != "general.architecture":
                _add_kv(writer, k, v)
        self.offsets: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        off, align = 0, writer.data_alignment
        for name, (fmt, shape) in specs.items():
            if fmt not in FORMATS:
                raise WeightError(f"{self.path}: cannot write tensor '{name}' as {fmt!r}; "
                                  f"supported: {', '.join(FORMATS)}")
            sshape = storage_shape(fmt, shape)
            n = int(np.prod(sshape)) * np.dtype(STORAGE_DTYPE[fmt]).itemsize
            writer.add_tensor_info(name, sshape if fmt in QUANT_SIZES else shape,
                                   np.dtype(STORAGE_DTYPE[fmt]), n,
                                   raw_dtype=gguf.GGMLQuantizationType[GGML_TYPES[fmt]])
            self.offsets[name], self.nbytes[name] = off, n
            off += -(-n // align) * align
        writer.write_header_to_file(self.path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        self.fout = writer.fout[0]
        self.start = -(-self.fout.tell() // align) * align
        self.fout.truncate(self.start + off)

    def write(self, name: str, expert: int | None, arr: np.ndarray) -> int:
        fmt, shape = self.specs[name]
        arr = np.ascontiguousarray(arr)
        want = self.nbytes[name] if expert is None else self.nbytes[name] // shape[0]
        if arr.nbytes != want or arr.dtype != STORAGE_DTYPE[fmt]:
            where = name if expert is None else f"{name}[{expert}]"
            raise WeightError(f"{self.path}: data for '{where}' is {arr.dtype}{list(arr.shape)}, "
                              f"expected {want} bytes of {fmt}")
        self.fout.seek(self.start + self.offsets[name] + (0 if expert is None else expert * want))
        self.fout.write(arr.tobytes())
        return arr.nbytes

    def close(self) -> Path:
        self.writer.close()
        return self.path
