"""Damaged model files fail before anything is allocated, with an st-sdk error naming the file and the
field or tensor: huge counts, misplaced or duplicated tensors, types the data does not match, a wrong
tensor count, HF config values of the wrong type, malformed safetensors entries and index paths, and
corrupt vocabularies. Huge counts run in a child process with a deadline and a memory limit, so a
regression fails the test instead of hanging the suite."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

import st_sdk
from fuzzing import gguf_layout, run_isolated
from st_sdk.errors import ConfigError, STError, TokenizerError, WeightError


@pytest.fixture
def gguf_bytes(tiny_dir):
    data = tiny_dir["gguf"].read_bytes()
    return data, gguf_layout(data)


def patched(tmp_path, data: bytes, off: int, new: bytes, name: str = "m.gguf"):
    p = tmp_path / name
    p.write_bytes(data[:off] + new + data[off + len(new):])
    return p


def load_error(path, cls=STError, timeout=60):
    """The error a load of `path` raises in a child process (which must neither hang nor die)."""
    reports = run_isolated(str(path), backends=("numpy",), timeout=timeout)
    rep = reports[0]
    assert rep["outcome"] == "rejected", rep
    assert rep["error"].startswith(cls.__name__), rep
    assert path.name in rep["error"], rep
    return rep["error"]


# ---- GGUF: huge header values ------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["smallthinker.block_count", "smallthinker.expert_count",
                                 "smallthinker.attention.sliding_window", "smallthinker.embedding_length",
                                 "smallthinker.context_length"])
def test_gguf_huge_count_fails_at_once(gguf_bytes, tmp_path, key):
    data, lay = gguf_bytes
    kv = lay.kv(key)
    err = load_error(patched(tmp_path, data, kv.value_off, struct.pack("<I", 2**31 - 1)), ConfigError, timeout=30)
    assert key in err and "2147483647" in err


def test_gguf_expert_count_within_bounds_but_beyond_the_file(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    kv = lay.kv("smallthinker.expert_count")
    err = load_error(patched(tmp_path, data, kv.value_off, struct.pack("<I", 16000)), WeightError, timeout=30)
    assert "ffn_gate_exps" in err or "parameters" in err


def test_gguf_dims_whose_product_wraps_int64(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    t = next(t for t in lay.tensors if len(t.dims) == 2)
    p = patched(tmp_path, data, t.dims_off, struct.pack("<QQ", 2**32, 2**32))
    with pytest.raises(WeightError, match=rf"m\.gguf.*{t.name}"):
        st_sdk.load(p, backend="numpy")


# ---- GGUF: invalid files that used to load and run as garbage -------------------------------------------
def test_gguf_misaligned_tensor_offset(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    t = lay.tensors[5]
    p = patched(tmp_path, data, t.offset_off, struct.pack("<Q", t.offset + 4))
    with pytest.raises(WeightError, match=rf"m\.gguf: tensor '{t.name}' lies at data offset {t.offset + 4}, "
                                          r"not a multiple of the alignment 32"):
        st_sdk.load(p, backend="numpy")


def test_gguf_overlapping_tensor_offset(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    t, before = lay.tensors[5], lay.tensors[4]
    p = patched(tmp_path, data, t.offset_off, struct.pack("<Q", before.offset))
    with pytest.raises(WeightError, match=rf"m\.gguf: tensor '{t.name}' lies at data offset {before.offset}"):
        st_sdk.load(p, backend="numpy")


def test_gguf_duplicate_tensor_name(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    q = next(t for t in lay.tensors if t.name == "blk.1.attn_q.weight")
    p = patched(tmp_path, data, q.start + 8, b"blk.1.attn_k.weight")
    with pytest.raises(WeightError, match=r"m\.gguf: tensor 'blk\.1\.attn_k\.weight' appears twice"):
        st_sdk.load(p, backend="numpy")


def test_gguf_duplicate_metadata_key(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    k = lay.kv("smallthinker.block_count")
    at = lay.kvs[-1].end
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    head = data[:16] + struct.pack("<Q", n_kv + 1) + data[24:at] + data[k.start:k.end] + data[at:lay.header_end]
    pad = -len(head) % 32
    p = tmp_path / "m.gguf"
    p.write_bytes(head + b"\0" * pad + data[lay.data_start:])
    with pytest.raises(WeightError, match=r"m\.gguf: metadata key 'smallthinker\.block_count' appears twice"):
        st_sdk.load(p, backend="numpy")


def test_gguf_tensor_type_changed(gguf_bytes, tmp_path):
    """An F32 norm relabelled F16 would be read as half its bytes (NaN logits)."""
    data, lay = gguf_bytes
    norm = next(t for t in lay.tensors if t.name == "blk.0.attn_norm.weight")
    p = patched(tmp_path, data, norm.type_off, struct.pack("<I", 1))
    with pytest.raises(WeightError, match=r"m\.gguf: tensor '.*' lies at data offset"):
        st_sdk.load(p, backend="numpy")


def test_gguf_norm_of_a_block_type(gguf_bytes, tmp_path):
    """A 1-D norm stored as Q8_0 is refused even when its bytes would fit (here: the file is rebuilt so
    the sizes agree)."""
    import gguf
    import numpy as np

    from st_sdk.weights.gguf_file import GGUFModelFile, _add_kv

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "smallthinker")
    orig = tmp_path / "orig.gguf"
    orig.write_bytes(gguf_bytes[0])
    for k, v in GGUFModelFile(orig).metadata().items():
        if k != "general.architecture":
            _add_kv(w, k, v)
    for t in gguf.GGUFReader(orig).tensors:
        arr = np.array(t.data)
        if t.name == "blk.0.ffn_norm.weight":
            w.add_tensor(t.name, gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, arr, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightError, match=r"m\.gguf: tensor 'blk\.0\.ffn_norm\.weight' \(norm\) is a 1-D norm "
                                          r"but has type Q8_0"):
        st_sdk.load(tmp_path / "m.gguf", backend="numpy")


def test_gguf_tensor_count_one_lower(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    p = patched(tmp_path, data, 8, struct.pack("<Q", len(lay.tensors) - 1))
    with pytest.raises(WeightError, match=r"m\.gguf: .*bytes after the last tensor's data"):
        st_sdk.load(p, backend="numpy")


def test_gguf_renamed_output_tensor_does_not_tie_the_head(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    out = next(t for t in lay.tensors if t.name == "output.weight")
    p = patched(tmp_path, data, out.start + 8, b"outpux.weight")
    with pytest.raises(WeightError, match=r"m\.gguf: tensor 'outpux\.weight' is not part of a SmallThinker model"):
        st_sdk.load(p, backend="numpy")


def test_gguf_bad_alignment_value(gguf_bytes, tmp_path):
    data, lay = gguf_bytes
    key = b"general.alignment"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 24)
    at = lay.kvs[-1].end
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    head = data[:16] + struct.pack("<Q", n_kv + 1) + data[24:at] + kv + data[at:lay.header_end]
    p = tmp_path / "m.gguf"
    p.write_bytes(head + b"\0" * (-len(head) % 32) + data[lay.data_start:])
    with pytest.raises(WeightError, match=r"m\.gguf: metadata 'general\.alignment' must be a positive power of two"):
        st_sdk.load(p, backend="numpy")


@pytest.mark.parametrize("where", ["n_kv", "string length", "array length"])
def test_gguf_header_errors_name_the_file(gguf_bytes, tmp_path, where):
    data, lay = gguf_bytes
    if where == "n_kv":
        p = patched(tmp_path, data, 16, struct.pack("<Q", 2**64 - 1))
    elif where == "string length":
        p = patched(tmp_path, data, lay.kvs[3].start, struct.pack("<Q", 2**63))
    else:
        tokens = lay.kv("tokenizer.ggml.tokens")
        p = patched(tmp_path, data, tokens.value_off + 4, struct.pack("<Q", 2**62))
    with pytest.raises(WeightError, match=r"m\.gguf"):
        st_sdk.load(p, backend="numpy")


@pytest.mark.parametrize("value", [0, 3])
def test_gguf_gating_function_out_of_range(gguf_bytes, tmp_path, value):
    data, lay = gguf_bytes
    kv = lay.kv("smallthinker.expert_gating_func")
    p = patched(tmp_path, data, kv.value_off, struct.pack("<I", value))
    with pytest.raises(ConfigError, match=r"m\.gguf: metadata 'smallthinker\.expert_gating_func'"):
        st_sdk.load(p, backend="numpy")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_gguf_rope_base_not_finite(gguf_bytes, tmp_path, value):
    data, lay = gguf_bytes
    kv = lay.kv("smallthinker.rope.freq_base")
    p = patched(tmp_path, data, kv.value_off, struct.pack("<f", value))
    with pytest.raises(ConfigError, match=r"m\.gguf: metadata 'smallthinker\.rope\.freq_base'"):
        st_sdk.load(p, backend="numpy")


# ---- GGUF: corrupt vocabularies ------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["duplicate token", "merge of unknown tokens", "token type count",
                                    "eos id out of range"])
def test_gguf_corrupt_vocabulary(gguf_bytes, tmp_path, damage):
    import gguf
    import numpy as np

    from st_sdk.weights.gguf_file import GGUFModelFile, _add_kv

    orig = tmp_path / "orig.gguf"
    orig.write_bytes(gguf_bytes[0])
    meta = GGUFModelFile(orig).metadata()
    if damage == "duplicate token":
        meta["tokenizer.ggml.tokens"][7] = meta["tokenizer.ggml.tokens"][6]
    elif damage == "merge of unknown tokens":
        meta["tokenizer.ggml.merges"] = meta["tokenizer.ggml.merges"][:3] + ["zzzq qqqz"]
    elif damage == "token type count":
        meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:-1]
    else:
        meta["tokenizer.ggml.eos_token_id"] = 10**6
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "smallthinker")
    for k, v in meta.items():
        if k != "general.architecture":
            _add_kv(w, k, v)
    for t in gguf.GGUFReader(orig).tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises((TokenizerError, ConfigError), match=r"m\.gguf"):
        st_sdk.load(tmp_path / "m.gguf", backend="numpy")


# ---- HF ------------------------------------------------------------------------------------------------
def set_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field", ["moe_num_primary_experts", "num_hidden_layers"])
def test_hf_huge_count_fails_at_once(hf_copy, field):
    set_config(hf_copy, **{field: 10**9})
    err = load_error(hf_copy, ConfigError, timeout=30)
    assert field in err


@pytest.mark.parametrize("value", [1.5, "abc", -1, 1, [True]])
def test_hf_tie_word_embeddings_must_be_a_boolean(hf_copy, value):
    set_config(hf_copy, tie_word_embeddings=value)
    with pytest.raises(ConfigError, match=r"config\.json: field 'tie_word_embeddings' must be true or false"):
        st_sdk.load(hf_copy, backend="numpy")


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-1", "0", '"1e6"', "true"])
def test_hf_rope_theta_must_be_finite_and_positive(hf_copy, value):
    text = (hf_copy / "config.json").read_text().replace('"rope_theta": 1500000.0', f'"rope_theta": {value}')
    (hf_copy / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.json: field 'rope_theta' must be a finite positive number"):
        st_sdk.load(hf_copy, backend="numpy")


def test_hf_sliding_window_size_beyond_int64(hf_copy):
    set_config(hf_copy, sliding_window_size=2**63)
    with pytest.raises(ConfigError, match=r"config\.json: field 'sliding_window_size' must be an integer"):
        st_sdk.load(hf_copy, backend="numpy")


@pytest.mark.parametrize("value", ["SmallThinkerForCausalLM", 5, {"a": 1}, [5]])
def test_hf_architectures_not_a_list_of_strings(hf_copy, value):
    set_config(hf_copy, architectures=value)
    with pytest.raises(ConfigError, match=r"config\.json: field 'architectures' must be a list of strings"):
        st_sdk.load(hf_copy, backend="numpy")


def test_hf_deeply_nested_config(hf_copy):
    (hf_copy / "config.json").write_text("[" * 100000)
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON"):
        st_sdk.load(hf_copy, backend="numpy")


def _header(path):
    blob = path.read_bytes()
    (n,) = struct.unpack_from("<Q", blob, 0)
    return blob, n, json.loads(blob[8:8 + n])


def _write_header(path, blob, n, header=None, text=None):
    text = text if text is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def test_hf_float_data_offsets(hf_copy):
    f = hf_copy / "model.safetensors"
    blob, n, h = _header(f)
    name = "model.norm.weight"
    h[name]["data_offsets"] = [float(x) for x in h[name]["data_offsets"]]
    _write_header(f, blob, n, h)
    with pytest.raises(WeightError, match=rf"model\.safetensors: tensor '{name}' has malformed data_offsets"):
        st_sdk.load(hf_copy, backend="numpy")


def test_hf_duplicate_tensor_in_header(hf_copy):
    f = hf_copy / "model.safetensors"
    blob, n, h = _header(f)
    text = json.dumps(h)
    name = "model.norm.weight"
    dup = json.dumps({name: h[name]})[1:-1]
    _write_header(f, blob, n, text=(text[:-1] + ", " + dup + "}").encode())
    with pytest.raises(WeightError, match=rf"model\.safetensors: corrupt safetensors header: key '{name}' appears twice"):
        st_sdk.load(hf_copy, backend="numpy")


def test_hf_header_length_off_by_one(hf_copy):
    """A header one byte shorter still parses (its padding is spaces) but shifts every tensor's data."""
    f = hf_copy / "model.safetensors"
    blob = f.read_bytes()
    (n,) = struct.unpack_from("<Q", blob, 0)
    assert blob[8 + n - 1:8 + n] == b" "
    f.write_bytes(struct.pack("<Q", n - 1) + blob[8:])
    with pytest.raises(WeightError, match=r"model\.safetensors"):
        st_sdk.load(hf_copy, backend="numpy")


def test_hf_overlapping_entries(hf_copy):
    f = hf_copy / "model.safetensors"
    blob, n, h = _header(f)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[b]["data_offsets"]
    _write_header(f, blob, n, h)
    with pytest.raises(WeightError, match=r"model\.safetensors: tensor .* (overlaps|leaves a hole)"):
        st_sdk.load(hf_copy, backend="numpy")


@pytest.fixture
def sharded(tmp_path):
    from st_sdk.synth import write_model

    d = tmp_path / "sharded"
    write_model(d, formats="hf", shards=2)
    return d


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 5, None, ["a"]])
def test_hf_index_shard_outside_the_directory_or_not_a_name(sharded, shard):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    if isinstance(shard, str) and shard.startswith("../"):
        shutil.copy(sharded / "model-00001-of-00002.safetensors", sharded.parent / "outside.safetensors")
    with pytest.raises(WeightError, match=r"model\.safetensors\.index\.json: .*(outside the model directory|"
                                          r"must be a shard file name)"):
        st_sdk.load(sharded, backend="numpy")


def test_hf_index_path_that_stays_inside_is_accepted(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "./" + v for k, v in index["weight_map"].items()}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    st_sdk.load(sharded, backend="numpy")


@pytest.mark.parametrize("value", [5, {"x": 1}, [{"name": ["x"], "template": 3}]])
def test_hf_chat_template_of_the_wrong_type(hf_copy, value):
    tcfg = json.loads((hf_copy / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = value
    (hf_copy / "tokenizer_config.json").write_text(json.dumps(tcfg))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: 'chat_template' must be a string"):
        st_sdk.load(hf_copy, backend="numpy")


def test_hf_tensors_at_misaligned_offsets_reach_the_kernels_aligned(hf_copy, tiny_logits):
    """safetensors does not align tensor data: a 2-byte tensor first shifts every float32 tensor off its
    4-byte alignment. The C backend copies such storage before its kernels load whole elements."""
    from conftest import TINY_IDS, rel_err

    f = hf_copy / "model.safetensors"
    blob, n, h = _header(f)
    for e in h.values():
        if isinstance(e, dict) and "data_offsets" in e:
            e["data_offsets"] = [x + 2 for x in e["data_offsets"]]
    h["aaa.padding"] = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
    text = json.dumps(h).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + b"\0\0" + blob[8 + n:])
    m = st_sdk.load(hf_copy, backend="c", kv_dtype="f32")   # f32 KV: the 1e-4 bound below
    assert not m.params.layers[0].attn_norm.raw.data.flags.aligned   # the file's view is misaligned
    assert all(lp.attn_norm.value.flags.aligned and lp.ffn_norm.value.flags.aligned for lp in m.params.layers)
    assert rel_err(m.logits(TINY_IDS), tiny_logits) < 1e-4
