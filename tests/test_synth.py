"""Synthetic model files: same weights in HF and GGUF, deterministic, streamed; `st-sdk synth`."""
from __future__ import annotations

import numpy as np
import pytest

from st_sdk.cli import main as cli
from st_sdk.errors import InputError
from st_sdk.synth import random_weights, synth_config, write_model
from st_sdk.weights import open_model
from st_sdk.weights.layout import hf_to_gguf


def test_same_weights_in_both_formats(tiny_dir, tiny_config):
    hf, gg = open_model(tiny_dir["hf"]), open_model(tiny_dir["gguf"])
    assert hf.config == gg.config == tiny_config[0]
    for hf_name, (gname, e) in hf_to_gguf(hf.config).items():
        t = gg.get(gname)
        np.testing.assert_array_equal(hf.get(hf_name).numpy(), (t.expert(e) if e is not None else t).numpy())


def test_seed_decides_the_weights(tmp_path):
    a = write_model(tmp_path / "a", formats="gguf", seed=1)["gguf"].read_bytes()
    b = write_model(tmp_path / "b", formats="gguf", seed=1)["gguf"].read_bytes()
    c = write_model(tmp_path / "c", formats="gguf", seed=2)["gguf"].read_bytes()
    assert a == b and a != c


def test_random_weights_statistics(tiny_config):
    w = dict(random_weights(tiny_config[0], 0))
    emb = w["model.embed_tokens.weight"]
    assert emb.dtype == np.float32 and abs(emb.std() - 0.02) < 0.002 and abs(emb.mean()) < 0.002
    norm = w["model.norm.weight"]
    assert abs(norm.mean() - 1.0) < 0.02


def test_overrides_and_layers(tmp_path):
    paths = write_model(tmp_path, layers=8, formats=("hf", "gguf"), sliding_window_size=64)
    for p in paths.values():
        cfg = open_model(p).config
        assert cfg.num_hidden_layers == 8 and cfg.sliding_window_size == 64
        assert cfg.rope_layout == (0, 1, 1, 1, 0, 1, 1, 1)


def test_tied_preset_writes_no_head(tmp_path):
    """4b-a0.6b shapes are tied; a 1-layer cut with a small vocabulary keeps the test fast."""
    paths = write_model(tmp_path, preset="4b-a0.6b", layers=1, formats="gguf", dtype="q4_0",
                        vocab_size=1024, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=64, moe_num_primary_experts=4, moe_num_active_primary_experts=2,
                        moe_ffn_hidden_size=64)
    mf = open_model(paths["gguf"])
    assert mf.config.tie_word_embeddings and "output.weight" not in mf.names
    assert mf.get("token_embd.weight").fmt == "q4_0"


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="preset"):
        write_model(tmp_path, preset="70b")
    with pytest.raises(InputError, match="formats"):
        write_model(tmp_path, formats="onnx")
    with pytest.raises(InputError, match="shards"):
        write_model(tmp_path, shards=0)


def test_synth_cli(tmp_path, capsys):
    assert cli(["synth", str(tmp_path), "--preset", "tiny", "--layers", "2", "--format", "gguf",
                "--dtype", "q8_0", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "tiny-q8_0.gguf" in out
    mf = open_model(tmp_path / "tiny-q8_0.gguf")
    assert mf.config.num_hidden_layers == 2 and mf.get("blk.0.attn_q.weight").fmt == "q8_0"
    assert cli(["synth", str(tmp_path / "x"), "--format", "hf", "--dtype", "q4_0"]) == 1
    assert "q4_0" in capsys.readouterr().err


def test_synth_config_carries_tokenizer_ids():
    cfg, tok = synth_config("tiny")
    assert set(cfg.eos_token_id) == set(tok.eos_ids) and cfg.bos_token_id == tok.token_to_id("<|endoftext|>")


def test_writing_streams_tensor_by_tensor(tmp_path):
    """Peak Python/numpy memory while writing stays a small fraction of the model: one tensor at a time."""
    import tracemalloc

    write_model(tmp_path / "warm", layers=1, formats=("hf", "gguf"))   # imports are not the model
    tracemalloc.start()
    try:
        paths = write_model(tmp_path, layers=8, formats=("hf", "gguf"), hidden_size=256, moe_ffn_hidden_size=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = paths["gguf"].stat().st_size
    assert size > 25_000_000
    assert peak < size / 8, (peak, size)   # measured ~1/20: the largest tensor plus bookkeeping


def test_routing_skew_concentrates_picks_on_a_quarter_of_the_experts():
    """`routing_skew` makes a few experts per layer hot, as the paper reports for real models."""
    from collections import Counter

    from st_sdk.loader import build_model
    from st_sdk.synth import preset_config
    from st_sdk.weights.layout import assemble
    from st_sdk.weights.tensor import WeightTensor

    cfg = preset_config("tiny", num_hidden_layers=1, rope_layout=(1,), sliding_window_layout=(0,),
                        moe_num_primary_experts=16)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 300)
    share = {}
    for skew in (0.0, 2.0):
        t = {n: WeightTensor(n, "f32", x.shape, x) for n, x in random_weights(cfg, 0, skew)}
        m = build_model(cfg, assemble(cfg, t.__getitem__, "hf"), backend="numpy")
        picks = m.ops.route(m.params.embed.raw.numpy()[ids], m.params.layers[0].router, 2, False)[1]
        counts = sorted(Counter(picks.ravel().tolist()).values(), reverse=True)
        share[skew] = sum(counts[:4]) / sum(counts)      # share of picks on the top quarter
    assert share[0.0] < 0.5
    assert share[2.0] > 0.8
