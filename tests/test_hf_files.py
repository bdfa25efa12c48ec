"""HF directories: config.json + safetensors (single or sharded), F32/F16/BF16, memory-mapped."""
from __future__ import annotations

import json

import numpy as np
import pytest

import st_sdk
from conftest import TINY_IDS, rel_err
from st_sdk.synth import random_weights, write_model
from st_sdk.weights import open_model


def test_hf_single_file_matches_in_memory_model(tiny_dir, tiny_logits, tiny_config):
    m = st_sdk.load(tiny_dir["hf"], backend="numpy")
    assert m.config == tiny_config[0]
    assert rel_err(m.logits(TINY_IDS), tiny_logits) < 1e-5


def test_hf_matches_independent_reference(tiny_dir):
    reference = pytest.importorskip("reference")
    mf = open_model(tiny_dir["hf"])
    weights = {n: mf.get(n).numpy() for n in mf.names}
    want = reference.reference_logits(mf.config, weights, TINY_IDS)
    got = st_sdk.load(tiny_dir["hf"], backend="numpy").logits(TINY_IDS)
    assert rel_err(got, want) < 1e-4


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny_logits):
    paths = write_model(tmp_path, formats="hf", shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    m = st_sdk.load(paths["hf"], backend="numpy")
    assert rel_err(m.logits(TINY_IDS), tiny_logits) < 1e-5


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_checkpoints(tmp_path, tiny_config, tiny_logits, dtype):
    """A half-precision file gives exactly the logits of the same weights rounded in memory; against
    f32 it stays within 0.1 of the logit range (random routers have near-tied experts, so one
    rounding can flip an expert at some position: a few % there, ~5e-4 (f16) / 4e-3 (bf16) elsewhere)."""
    from st_sdk.loader import build_model
    from st_sdk.synth import random_params

    write_model(tmp_path, formats="hf", dtype=dtype)
    mf = open_model(tmp_path)
    assert mf.get("model.layers.0.self_attn.q_proj.weight").fmt == dtype
    assert mf.get("model.layers.0.block_sparse_moe.primary_router.weight").fmt == "f32"
    assert mf.get("model.norm.weight").fmt == "f32"
    got = st_sdk.load(tmp_path, backend="numpy").logits(TINY_IDS)
    cfg = tiny_config[0]
    same = build_model(cfg, random_params(cfg, 0, dtype), backend="numpy").logits(TINY_IDS)
    assert rel_err(got, same) < 1e-5
    assert rel_err(got, tiny_logits) < 0.1


def test_tensors_are_memory_mapped_not_copied(tiny_dir):
    t = open_model(tiny_dir["hf"]).get("model.embed_tokens.weight")
    base = t.data
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    assert not t.data.flags.owndata


def test_written_safetensors_are_standard(tiny_dir, tiny_config):
    """Files we write load in the safetensors package itself, with the synthetic weights."""
    from safetensors.numpy import load_file

    tensors = load_file(str(tiny_dir["hf"] / "model.safetensors"))
    want = dict(random_weights(tiny_config[0], 0))
    assert set(tensors) == set(want)
    name = "model.layers.1.block_sparse_moe.experts.3.down.weight"
    np.testing.assert_array_equal(tensors[name], want[name])


def test_tokenizer_files_are_written_and_loaded(tiny_dir):
    d = tiny_dir["hf"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file()
    tok = open_model(d).tokenizer
    assert tok.chat_template and len(tok.eos_ids) == 2


def test_load_with_quantize_converts_matrices_only(tiny_dir, tiny_logits):
    m = st_sdk.load(tiny_dir["hf"], backend="numpy", quantize="q8_0")
    lp = m.params.layers[0]
    assert lp.wq.raw.fmt == "q8_0" and lp.gate.raw.fmt == "q8_0"
    assert lp.router.raw.fmt == "f32" and lp.attn_norm.raw.fmt == "f32"
    assert rel_err(m.logits(TINY_IDS), tiny_logits) < 0.1
    with pytest.raises(st_sdk.InputError, match="quantize"):
        st_sdk.load(tiny_dir["hf"], quantize="q7_k")
