"""GGUF files: config and tokenizer from metadata, F32/F16/BF16/Q8_0/Q4_0 tensors memory-mapped,
quantised ones kept quantised; `st-sdk quantize` and `st-sdk info`."""
from __future__ import annotations

import json

import numpy as np
import pytest

import st_sdk
from conftest import TINY_IDS, rel_err
from st_sdk.cli import main as cli
from st_sdk.loader import build_model
from st_sdk.synth import random_params, write_model
from st_sdk.weights import open_model


def test_gguf_f32_matches_in_memory_model(tiny_dir, tiny_logits, tiny_config):
    m = st_sdk.load(tiny_dir["gguf"], backend="numpy")
    assert m.config == tiny_config[0]
    assert m.tokenizer is not None and m.tokenizer.chat_template
    assert rel_err(m.logits(TINY_IDS), tiny_logits) < 1e-5


def test_gguf_metadata_has_the_keys_llama_cpp_reads(tiny_dir):
    from st_sdk.weights.gguf_file import GGUFModelFile

    g = GGUFModelFile(tiny_dir["gguf"])
    for key in ("general.architecture", "smallthinker.block_count", "smallthinker.context_length",
                "smallthinker.embedding_length", "smallthinker.feed_forward_length",
                "smallthinker.attention.head_count", "smallthinker.attention.head_count_kv",
                "smallthinker.attention.key_length", "smallthinker.rope.freq_base",
                "smallthinker.attention.layer_norm_rms_epsilon", "smallthinker.expert_count",
                "smallthinker.expert_used_count", "smallthinker.expert_feed_forward_length",
                "smallthinker.expert_gating_func", "smallthinker.attention.sliding_window",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
        assert g.value(key) is not None, key
    assert g.value("tokenizer.ggml.pre") == "qwen2"
    assert g.value("smallthinker.expert_gating_func") == 2   # sigmoid
    assert len(g.value("tokenizer.ggml.tokens")) == 512


def test_gguf_without_sliding_window_is_all_rope_global(tmp_path):
    write_model(tmp_path, formats="gguf", preset="tiny", rope_layout=(1,) * 4, sliding_window_layout=(0,) * 4)
    cfg = open_model(next(tmp_path.glob("*.gguf"))).config
    assert cfg.rope_layout == (1,) * 4 and cfg.sliding_window_layout == (0,) * 4


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_gguf_equals_reference_on_dequantized_weights(tmp_path, tiny_config, tiny_logits, dtype):
    """Q8_0/Q4_0 stay quantised in memory and compute exactly what the NumPy reference computes on the
    dequantised weights. Against f32: q8_0 within 0.1 of the logit range, q4_0 keeps a logit
    correlation above 0.8 (4-bit random weights flip routing often; measured ~0.95)."""
    path = write_model(tmp_path, formats="gguf", dtype=dtype)["gguf"]
    mf = open_model(path)
    t = mf.get("blk.0.ffn_up_exps.weight")
    assert t.fmt == dtype and t.data.dtype == np.uint8 and not t.data.flags.owndata
    assert mf.get("blk.0.ffn_gate_inp.weight").fmt == "f32"
    got = st_sdk.load(path, backend="numpy").logits(TINY_IDS)
    cfg = tiny_config[0]
    same = build_model(cfg, random_params(cfg, 0, dtype), backend="numpy").logits(TINY_IDS)
    assert rel_err(got, same) < 1e-5
    reference = pytest.importorskip("reference")
    from st_sdk.weights.layout import hf_to_gguf

    weights = {}
    for hf_name, (gname, e) in hf_to_gguf(cfg).items():
        w = mf.get(gname)
        weights[hf_name] = (w.expert(e) if e is not None else w).numpy()
    assert rel_err(got, reference.reference_logits(cfg, weights, TINY_IDS)) < 1e-4
    if dtype == "q8_0":
        assert rel_err(got, tiny_logits) < 0.1
    else:
        assert np.corrcoef(got.ravel(), tiny_logits.ravel())[0, 1] > 0.8


def test_gguf_bf16_tensors_are_read_as_bf16(tmp_path, tiny_config):
    path = write_model(tmp_path, formats="gguf", dtype="bf16")["gguf"]
    mf = open_model(path)
    assert mf.get("blk.1.attn_q.weight").fmt == "bf16"
    cfg = tiny_config[0]
    same = build_model(cfg, random_params(cfg, 0, "bf16"), backend="numpy").logits(TINY_IDS)
    assert rel_err(st_sdk.load(path, backend="numpy").logits(TINY_IDS), same) < 1e-5


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_quantize_cli(tmp_path, tiny_dir, tiny_config, source, capsys):
    out = tmp_path / "out.gguf"
    assert cli(["quantize", str(tiny_dir[source]), str(out), "--type", "q8_0"]) == 0
    mf = open_model(out)
    assert mf.get("blk.0.attn_k.weight").fmt == "q8_0"
    assert mf.get("blk.0.ffn_gate_inp.weight").fmt == "f32" and mf.get("blk.0.attn_norm.weight").fmt == "f32"
    assert mf.tokenizer.encode("héllo 你好") == open_model(tiny_dir["hf"]).tokenizer.encode("héllo 你好")
    cfg = tiny_config[0]
    same = build_model(cfg, random_params(cfg, 0, "q8_0"), backend="numpy").logits(TINY_IDS)
    assert rel_err(st_sdk.load(out, backend="numpy").logits(TINY_IDS), same) < 1e-5


def test_quantize_cli_rejects_bad_output(tmp_path, tiny_dir, capsys):
    assert cli(["quantize", str(tiny_dir["hf"]), str(tmp_path / "out.bin")]) == 1
    assert "out.bin" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_info_cli(tiny_dir, source, capsys):
    assert cli(["info", str(tiny_dir[source]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == source and d["layers"] == 4
    assert d["layer_layout"] == ["NoPE+global", "RoPE+SWA8", "RoPE+SWA8", "RoPE+SWA8"]
    mf = open_model(tiny_dir[source])
    stored = sum(int(np.prod(mf.get(n).shape)) for n in mf.names)
    assert d["parameters"] == stored
    assert d["tokenizer"] and d["chat_template"]
    assert d["weight_types"]["router"] == {"f32": 4}
    assert cli(["info", str(tiny_dir[source])]) == 0
    text = capsys.readouterr().out
    assert "active per token" in text and "KV cache" in text


def test_info_counts_match_the_paper():
    from st_sdk.cli.info import active_parameters
    from st_sdk.synth import preset_config

    small, large = preset_config("4b-a0.6b"), preset_config("21b-a3b")
    assert small.parameter_count() == 4_035_085_824 and large.parameter_count() == 21_506_562_560
    assert round(active_parameters(small) / 1e9, 2) == 0.86 and round(active_parameters(large) / 1e9, 2) == 3.33
