"""Every bad input fails with an st-sdk error whose message names the file, tensor, field or argument."""
from __future__ import annotations

import json

import numpy as np
import pytest

import st_sdk
from st_sdk.errors import ConfigError, InputError, WeightError
from st_sdk.synth import write_model


def resave(d, change):
    """Rewrite model.safetensors after `change(dict of arrays)`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_missing_config_json(hf_copy):
    (hf_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        st_sdk.load(hf_copy)


def test_malformed_config_json(hf_copy):
    (hf_copy / "config.json").write_text('{"architectures": ["SmallThinkerForCausalLM"], ')
    with pytest.raises(ConfigError, match=r"config\.json.*malformed"):
        st_sdk.load(hf_copy)


def test_config_of_another_architecture(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        st_sdk.load(hf_copy)


def test_missing_shard(tmp_path):
    write_model(tmp_path, formats="hf", shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors.*missing"):
        st_sdk.load(tmp_path)


def test_index_names_a_tensor_the_shard_lacks(tmp_path):
    write_model(tmp_path, formats="hf", shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match="model.extra.weight"):
        st_sdk.load(tmp_path)


def test_truncated_safetensors(hf_copy):
    f = hf_copy / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(WeightError, match=r"model\.safetensors.*truncated"):
        st_sdk.load(hf_copy)


def test_safetensors_with_garbage_header(hf_copy):
    (hf_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightError, match=r"model\.safetensors"):
        st_sdk.load(hf_copy)


def test_wrong_shape_tensor(hf_copy):
    name = "model.layers.2.self_attn.k_proj.weight"
    resave(hf_copy, lambda t: t.__setitem__(name, np.zeros((16, 64), np.float32)))
    with pytest.raises(WeightError, match=rf"{name}.*shape \[16, 64\], expected \[32, 64\]"):
        st_sdk.load(hf_copy)


def test_unsupported_dtype(hf_copy):
    name = "model.layers.0.self_attn.o_proj.weight"
    resave(hf_copy, lambda t: t.__setitem__(name, t[name].astype(np.float64)))
    with pytest.raises(WeightError, match=rf"{name}.*F64.*F32, F16, BF16"):
        st_sdk.load(hf_copy)


def test_missing_tensor(hf_copy):
    name = "model.layers.3.block_sparse_moe.experts.5.up.weight"
    resave(hf_copy, lambda t: t.pop(name))
    with pytest.raises(WeightError, match=rf"'{name}' is missing"):
        st_sdk.load(hf_copy)


def test_truncated_gguf(tiny_dir, tmp_path):
    f = tmp_path / "cut.gguf"
    data = tiny_dir["gguf"].read_bytes()
    for keep in (len(data) - 4096, 3000, 100):   # inside the tensor data, the metadata, the header
        f.write_bytes(data[:keep])
        with pytest.raises(WeightError, match="cut.gguf"):
            st_sdk.load(f)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(WeightError, match="fake.gguf"):
        st_sdk.load(f)


def _rewrite_gguf(src, dst, arch="smallthinker", replace=None, drop=()):
    """Copy a GGUF's metadata and tensors, optionally as another architecture or with one tensor
    replaced by (raw uint8 data, GGMLQuantizationType)."""
    import gguf

    from st_sdk.weights.gguf_file import GGUFModelFile, _add_kv

    w = gguf.GGUFWriter(dst, arch)
    for k, v in GGUFModelFile(src).metadata().items():
        if k != "general.architecture" and k not in drop:
            _add_kv(w, k.replace("smallthinker.", f"{arch}."), v)
    for t in gguf.GGUFReader(src).tensors:
        if replace and t.name in replace:
            data, qtype = replace[t.name]
            w.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_of_another_architecture(tiny_dir, tmp_path):
    _rewrite_gguf(tiny_dir["gguf"], tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ConfigError, match="'llama'"):
        st_sdk.load(tmp_path / "llama.gguf")


def test_gguf_missing_metadata_key(tiny_dir, tmp_path):
    _rewrite_gguf(tiny_dir["gguf"], tmp_path / "m.gguf", drop=("smallthinker.expert_count",))
    with pytest.raises(ConfigError, match=r"m\.gguf.*smallthinker\.expert_count"):
        st_sdk.load(tmp_path / "m.gguf")


def test_gguf_unsupported_quant_type(tiny_dir, tmp_path):
    import gguf

    # a Q8_K [64, 256] tensor (ggml's activation type: no weight file holds it, gguf-py cannot read it)
    q8k = np.zeros((64, 292), np.uint8)
    _rewrite_gguf(tiny_dir["gguf"], tmp_path / "k.gguf",
                  replace={"blk.1.attn_q.weight": (q8k, gguf.GGMLQuantizationType.Q8_K)})
    with pytest.raises(WeightError, match=r"blk\.1\.attn_q\.weight.*Q8_K.*supported: F32, F16, BF16, .*Q4_K"):
        st_sdk.load(tmp_path / "k.gguf")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightError, match="notes.txt"):
        st_sdk.load(tmp_path / "notes.txt")
    with pytest.raises(WeightError, match="nowhere"):
        st_sdk.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="config.json"):
        st_sdk.load(tmp_path)   # a directory without config.json


def test_token_id_outside_vocabulary(tiny_dir):
    m = st_sdk.load(tiny_dir["gguf"], backend="numpy")
    with pytest.raises(InputError, match=r"ids\[1\] = 512 is outside the vocabulary"):
        m.logits([1, 512, 3])
    with pytest.raises(InputError, match="outside the vocabulary"):
        m.logits([-1])
    with pytest.raises(InputError, match="token ids must be integers, got bool"):
        m.logits([True])   # a bool is no token id, however short the list


def test_decode_step_beyond_context(tmp_path):
    path = write_model(tmp_path, formats="gguf", max_position_embeddings=16)["gguf"]
    s = st_sdk.load(path, backend="numpy").session()
    s.feed(list(range(15)))
    s.feed([3])   # the 16th token fits
    with pytest.raises(InputError, match="17 tokens exceed the model.s context of 16 tokens"):
        s.feed([4])
    assert len(s.tokens) == 16


def test_prompt_beyond_context(tmp_path):
    path = write_model(tmp_path, formats="gguf", max_position_embeddings=16)["gguf"]
    m = st_sdk.load(path, backend="numpy")
    assert m.config.max_position_embeddings == 16
    with pytest.raises(InputError, match="17 tokens exceed the model.s context of 16 tokens"):
        m.logits(list(range(17)))


def test_synth_refuses_quantized_hf(tmp_path):
    with pytest.raises(InputError, match="q8_0"):
        write_model(tmp_path, formats=("hf", "gguf"), dtype="q8_0")
    assert not any(tmp_path.iterdir())   # nothing half-written
