"""The trained SmallThinker shipped in st_sdk/data: what every backend makes of it against the float64
reference, perplexity and KL divergence (`st-sdk perplexity`), the demo, the routing measured on it
and `st-sdk synth --routing trained`, and the torch model it was trained as (tools/train_smallthinker.py)."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import st_sdk
from reference import hf_weights_from_params, reference_logits
from st_sdk.cli import main as cli
from st_sdk.data import HELDOUT_TEXT, MODEL, ROUTING_STATS
from st_sdk.perplexity import chunk_scores, perplexity
from st_sdk.registry import get_registry

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 128
N_TOKENS = 256          # two chunks of 128 tokens, longer than the 64-token sliding window

needs_model = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is not built (tools/train_smallthinker.py --ship)")


def numpy_model(fmt: str | None = None):
    """The shipped model on the NumPy backend, its weights re-stored as `fmt` first, then held as
    float32 so each forward does not dequantise them again (the same numbers the NumPy backend
    computes on the quantised tensors)."""
    from st_sdk.loader import convert_params
    from st_sdk.loader import build_model
    from st_sdk.weights import open_model

    mf = open_model(MODEL)
    params = mf.params() if fmt is None else convert_params(mf.params(), fmt, mf.config)
    return build_model(mf.config, convert_params(params, "f32", mf.config), backend="numpy", tokenizer=mf.tokenizer,
                       path=str(MODEL))


@pytest.fixture(scope="module")
def model():
    return numpy_model()


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))[:N_TOKENS]


@pytest.fixture(scope="module")
def reference_ppl(model, ids):
    """Perplexity from the float64 reference forward on the file's own (dequantised) weights."""
    w = hf_weights_from_params(model.params)
    nll = []
    for s in range(0, len(ids), CONTEXT):
        chunk = np.asarray(ids[s:s + CONTEXT])
        nll.append(chunk_scores(reference_logits(model.config, w, chunk)[:-1], chunk[1:])[0])
    return float(np.exp(np.concatenate(nll).mean()))


def _backend_or_skip(name: str):
    cls = get_registry().backends().get(name)
    if cls is None:
        pytest.skip(f"backend {name!r} is not registered")
    b = cls()
    if not b.is_available():
        pytest.skip(f"backend {name!r} unavailable: {b.unavailable_reason()}")


@needs_model
@pytest.mark.parametrize("backend", ["numpy", "c", "torch", "jax"])
def test_perplexity_matches_the_float64_reference(backend, ids, reference_ppl):
    """Every backend at its default settings (torch and jax compute in bfloat16 on CPU) within 1%."""
    _backend_or_skip(backend)
    m = st_sdk.load(MODEL, backend=backend)
    res = perplexity(m, ids, context=CONTEXT)
    assert res.scored == N_TOKENS - N_TOKENS // CONTEXT
    assert abs(res.perplexity / reference_ppl - 1) < 0.01, (res.perplexity, reference_ppl)


@needs_model
def test_far_better_than_a_uniform_model(model, reference_ppl):
    """Trained, not random: held-out perplexity at least ten times below a uniform guess's (the vocabulary
    size; the shipped model scores about 100 against 2048)."""
    assert reference_ppl < model.config.vocab_size / 10, reference_ppl


@needs_model
@pytest.mark.slow
def test_kl_divergence_grows_as_bits_drop(model, ids):
    """Re-quantised from the shipped Q8_0 weights (exact in float32, the base here) with llama.cpp's
    mixes: Q8_0 again is lossless, F16 changes little, and KL divergence grows as bits drop to Q2_K."""
    kl = {t: perplexity(numpy_model(t), ids[:CONTEXT], context=CONTEXT, base=model).kl
          for t in ("q8_0", "f16", "q6_k", "q4_k_m", "q3_k_m", "q2_k")}
    assert kl["q8_0"].mean == 0 and kl["q8_0"].top1_agreement == 1
    assert 0 < kl["f16"].mean < kl["q6_k"].mean < kl["q4_k_m"].mean < kl["q3_k_m"].mean < kl["q2_k"].mean
    assert kl["q2_k"].p99 > kl["f16"].p99
    assert kl["q2_k"].top1_agreement <= kl["q6_k"].top1_agreement


@needs_model
def test_perplexity_cli_json(capsys, tmp_path):
    stats = tmp_path / "routing.json"
    code = cli(["perplexity", "demo", "demo", "--backend", "numpy", "--max-tokens", "100", "--context", "64",
                "--kl-divergence", "demo", "--routing-stats", str(stats), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["vocab_size"] == 2048 and out["tokens"] == 100 and out["chunks"] == 2 and out["scored"] == 98
    assert 1 < out["perplexity"] < 2048 and out["weight_format"] == "q8_0"
    kl = out["kl_divergence"]   # the model against itself
    assert kl["mean"] == 0 and kl["top1_agreement"] == 1 and kl["base_perplexity"] == pytest.approx(out["perplexity"])
    from st_sdk.routing import RoutingStats

    rs = RoutingStats.load(stats)
    assert rs.tokens == 100 and len(rs.layers) == 8 and rs.experts == 8 and rs.active == 2


@needs_model
def test_perplexity_cli_text_output_and_errors(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Return the number of items in the list.\n" * 5)
    assert cli(["perplexity", "demo", str(text), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "perplexity:" in out and "2048-token vocabulary" in out
    assert cli(["perplexity", "demo", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: text file not found" in capsys.readouterr().err
    assert cli(["perplexity", "demo", str(text), "--backend", "numpy", "--context", "4096"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err


@needs_model
def test_demo_prints_readable_text_from_the_shipped_model(capsys):
    """Words of the generated text are mostly words of English documentation (those of the held-out
    text, of Python's language reference as pydoc has it, and builtin names), not made-up ones."""
    import builtins

    from pydoc_data.topics import topics

    assert cli(["demo", "-n", "40", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert str(MODEL) in out and "RANDOM" not in out
    text = out.split("---\n")[1]
    words = re.findall(r"[A-Za-z]{2,}", text)
    docs = HELDOUT_TEXT.read_text(encoding="utf-8") + " ".join(topics.values()) + " ".join(dir(builtins))
    known = set(w.lower() for w in re.findall(r"[A-Za-z]{2,}", docs))
    assert len(words) >= 10, text
    assert sum(w.lower() in known for w in words) / len(words) > 0.8, text


@needs_model
def test_llama_cpp_runs_the_shipped_file(model, ids):
    """llama.cpp loads the shipped GGUF, tokenizes as st-sdk does and predicts the same next tokens
    (64 tokens: llama.cpp fixes the sliding window at 4096, so longer sequences would differ)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    text = HELDOUT_TEXT.read_text(encoding="utf-8")[:400]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == model.tokenizer.encode(text)
    seq = ids[:64]
    llm.eval(seq)
    theirs = np.array(llm.scores[:len(seq)], dtype=np.float32)
    ours = model.logits(seq)
    assert (theirs.argmax(1) == ours.argmax(1)).mean() > 0.95   # llama.cpp quantises activations for Q8_0
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 0.02


@needs_model
def test_ranking_by_sigmoid_score_picks_the_experts_ranking_by_logit_picks(model, ids):
    """Runtimes that rank experts by float32 sigmoid score (llama.cpp) rather than by logit (st-sdk,
    HF) pick the same experts only while sigmoid still tells the logits apart; above 16.6 it is exactly
    1 and every such expert ties. Training's router z-loss keeps the logits small; a checkpoint trained
    without it reached the tie region after the first layer and llama.cpp's logits differed by 0.2."""
    import dataclasses

    ops, logits = model.ops, []

    def route(x, weight, k, softmax):
        logits.append(np.asarray(x, np.float32) @ weight.raw.numpy().T)
        return ops.route(x, weight, k, softmax)

    model.ops = dataclasses.replace(ops, route=route, layer=None, layers=None, forward=None)
    try:
        model.logits(ids)
    finally:
        model.ops = ops
    k = model.config.moe_num_active_primary_experts
    assert len(logits) == model.config.num_hidden_layers
    for layer in logits:
        assert layer.max() < 16.0
        score = 1 / (1 + np.exp(-layer))                       # float32, as llama.cpp computes it
        by_logit = np.sort(np.argsort(-layer, kind="stable")[:, :k], axis=1)
        by_score = np.sort(np.argsort(-score, kind="stable")[:, :k], axis=1)
        np.testing.assert_array_equal(by_score, by_logit)


@needs_model
def test_shipped_routing_statistics_are_those_of_the_shipped_model(model, ids):
    """ROUTING_STATS was measured on the held-out text; the first N_TOKENS give close shares."""
    from st_sdk.routing import RoutingRecorder, RoutingStats

    shipped = RoutingStats.load(ROUTING_STATS)
    with RoutingRecorder(model) as rec:
        perplexity(model, ids, context=CONTEXT)
    got = rec.stats()
    for a, b in zip(got.layers, shipped.layers):
        assert abs(a.relu_zero_fraction - b.relu_zero_fraction) < 0.05
        assert np.abs(np.sort(a.expert_share) - np.sort(b.expert_share)).max() < 0.1


def _measured_like_stats(path: Path):
    """Routing statistics of the kind a trained model has (skewed expert popularity that differs by
    layer, ReGLU zero fractions from 0.35 to 0.8), written as `st-sdk perplexity --routing-stats` does."""
    from st_sdk.routing import LayerRouting, RoutingStats

    rng = np.random.default_rng(5)
    layers = []
    for i in range(8):
        share = rng.dirichlet(np.full(8, 0.5 + i))
        layers.append(LayerRouting(expert_share=[float(x) for x in share], relu_zero_fraction=0.35 + 0.06 * i,
                                   reuse=0.3))
    RoutingStats(experts=8, active=2, tokens=4096, layers=layers, source="test").save(path)
    return RoutingStats.load(path)


@pytest.mark.parametrize("shipped", [False, pytest.param(True, marks=needs_model)])
def test_synth_routing_trained_reproduces_the_measured_statistics(tmp_path, shipped):
    """A random-weight model written with routing='trained[:STATS]' routes random tokens as the measured
    model routed real text: per layer, the sorted expert shares and the ReGLU zero fraction."""
    from conftest import routed_stats
    from st_sdk.routing import RoutingStats
    from st_sdk.synth import synth_config

    if shipped:
        target, spec = RoutingStats.load(ROUTING_STATS), "trained"
    else:
        target, spec = _measured_like_stats(tmp_path / "stats.json"), f"trained:{tmp_path / 'stats.json'}"
    cfg, _ = synth_config("tiny", layers=8)   # 8 experts, 2 active, like the trained model
    got = routed_stats(cfg, spec, tokens=768, seed=1)
    for i, (a, b) in enumerate(zip(got.layers, target.layers)):
        assert abs(a.relu_zero_fraction - b.relu_zero_fraction) < 0.04, i
        assert np.abs(np.sort(a.expert_share) - np.sort(b.expert_share)).max() < 0.05, (i, a, b)


def test_synth_routing_option_errors(tmp_path):
    from st_sdk.errors import InputError
    from st_sdk.synth import write_model

    with pytest.raises(InputError, match="unknown routing 'zipf'"):
        write_model(tmp_path, routing="zipf")
    with pytest.raises(InputError, match="not both"):
        write_model(tmp_path, routing="trained", routing_skew=1.0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"experts": 2}')
    with pytest.raises(InputError, match="not a routing statistics file"):
        write_model(tmp_path, routing=f"trained:{bad}")
    assert not list(tmp_path.glob("*.gguf"))
    assert cli(["synth", str(tmp_path / "x"), "--routing", "trained:missing.json"]) == 1


def test_resample_shares():
    from st_sdk.routing import resample_shares

    s = [0.4, 0.3, 0.2, 0.1]
    np.testing.assert_allclose(resample_shares(s, 4), s)
    r = resample_shares(s, 32)
    assert r.sum() == pytest.approx(1) and (np.diff(r) <= 1e-12).all()
    np.testing.assert_allclose(r[:8].sum(), 0.4)


# ---- the torch model of tools/train_smallthinker.py is the model st-sdk runs ---------------------
def _train_module():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("train_smallthinker", ROOT / "tools" / "train_smallthinker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tied", [True, False])
def test_training_model_gives_st_sdk_logits(tied):
    """The torch forward that training optimises against st-sdk's NumPy backend and the float64
    reference, on weights large enough that every feature (router input, ReGLU, NoPE/RoPE layout,
    window, GQA, head) moves the logits."""
    import torch

    from st_sdk.config import ModelConfig

    train = _train_module()
    hybrid = tuple(0 if i % 4 == 0 else 1 for i in range(8))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, moe_num_primary_experts=4, moe_num_active_primary_experts=2,
                      moe_ffn_hidden_size=16, rope_layout=hybrid, sliding_window_layout=hybrid, sliding_window_size=4,
                      rope_theta=100.0, tie_word_embeddings=tied, max_position_embeddings=64)
    m = train.build_torch_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 2.0, generator=g)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=g)
        m.embed.mul_(math.sqrt(32))
    ids = np.random.default_rng(2).integers(0, 64, 12)
    assert train.check_parity(m, cfg, ids, tol=1e-4) < 1e-4
    with torch.no_grad():
        ours = m(torch.as_tensor(ids[None]))[0][0].double().numpy()
    ref = reference_logits(cfg, dict(train.hf_tensors(m, cfg)), ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_training_resumes_from_its_checkpoint(tmp_path):
    """A run stopped after an evaluation and resumed with --resume ends with the weights of an
    uninterrupted run (same data order, optimiser state and learning-rate schedule)."""
    import argparse

    import torch

    from st_sdk.config import ModelConfig

    train = _train_module()
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, moe_num_primary_experts=4, moe_num_active_primary_experts=2,
                      moe_ffn_hidden_size=8, rope_layout=(0, 1), sliding_window_layout=(0, 1), sliding_window_size=4,
                      rope_theta=100.0, tie_word_embeddings=True, max_position_embeddings=64)
    data = np.random.default_rng(3).integers(0, 64, 2000).astype(np.int32)

    def run(out: Path, resume: bool, stop_at: int | None = None):
        args = argparse.Namespace(out=out, resume=resume, steps=4, lr=3e-3, warmup=2, batch=2, seq=16, balance=0.01, router_z=1e-3,
                                  seed=0, eval_every=2, eval_seqs=1)
        m = train.build_torch_model(cfg, seed=0)

        def log(msg):
            if stop_at is not None and msg.startswith(f"step {stop_at}/"):
                raise KeyboardInterrupt   # stopped before that evaluation's checkpoint was written
        try:
            hist = train.train(m, cfg, data, data, args, log)
        except KeyboardInterrupt:
            return None, None
        return m, hist

    (tmp_path / "a").mkdir()
    whole, hist = run(tmp_path / "a", resume=False)
    (tmp_path / "b").mkdir()
    assert run(tmp_path / "b", resume=False, stop_at=4) == (None, None)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed, hist2 = run(tmp_path / "b", resume=True)
    assert [r["step"] for r in hist2] == list(range(1, 5))
    assert [r["loss"] for r in hist2] == [r["loss"] for r in hist]
    for (n, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
