"""The timing harness and `st-sdk bench` on the tiny preset (tiny lengths; workers are real processes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from st_sdk import bench, synth
from st_sdk.cli import main
from st_sdk.timing import ModelRunner, Timing, time_decode, time_prefill, time_round


@pytest.fixture(scope="module")
def tiny():
    return synth.build_model("tiny", seed=0, fmt="f32", backend="numpy")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # model files synthesised by the bench go to a per-run folder, never the user's cache
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "st-cache"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_round_times_one_prefill_and_each_decoded_token(tiny):
    t = time_round(tiny, prompt_len=8, gen_len=3, warmup=1)
    t = time_round(tiny, prompt_len=8, gen_len=3, warmup=1, timing=t)
    assert len(t.prefill_s) == 2 and len(t.decode_s) == 6 and len(t.decode_rounds) == 2
    d = t.to_dict()
    assert d["prefill_tps"] == pytest.approx(8 / np.median(t.prefill_s))
    assert d["decode_tps"] == pytest.approx(1 / np.median(t.decode_s))
    assert d["decode_runs"] == 2 and d["decode_spread"] >= 0


def test_selection_entry_points_keep_working(tiny):
    assert len(time_prefill(tiny, prompt_len=6, repeats=2).prefill_s) == 2
    t = time_decode(tiny, n_tokens=3, context=4, warmup=1)
    assert len(t.decode_s) == 3 and t.decode_tps > 0
    assert np.isnan(Timing().decode_tps)


def test_runner_times_real_greedy_decoding(tiny):
    """What is timed is the model's own greedy continuation, token by token."""
    ids = np.arange(5, dtype=np.int64) * 7
    r = ModelRunner(tiny)
    toks = [r.prefill(ids)]
    for _ in range(2):
        toks.append(r.step(toks[-1]))
    full = tiny.logits(np.concatenate([ids, toks[:2]]))
    assert toks == [int(np.argmax(full[i])) for i in range(4, 7)]


def test_bytes_per_token_counts_dense_active_experts_and_head():
    cfg = synth.preset_config("tiny")
    params = synth.random_params(cfg, 0, "q8_0")
    H, E, F, k, V = (cfg.hidden_size, cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size,
                     cfg.moe_num_active_primary_experts, cfg.vocab_size)
    q8 = 34 / 32   # bytes per element
    dense = (cfg.q_dim * H * 2 + cfg.kv_dim * H * 2) * q8 + 2 * H * 4 + E * H * 4   # router stays f32
    experts = 3 * F * H * q8 * k
    want = cfg.num_hidden_layers * (dense + experts) + H * q8 + H * 4 + V * H * q8   # embed row, norm, head
    assert bench.bytes_per_token(params, cfg) == pytest.approx(want, abs=cfg.num_hidden_layers * 3)


def test_gguf_count_agrees_with_loaded_params(tmp_path):
    import st_sdk

    path = synth.write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=1)["gguf"]
    m = st_sdk.load(path, backend="numpy")
    assert bench.gguf_bytes_per_token(path) == bench.bytes_per_token(m.params, m.config)
    assert bench.gguf_format(path) == "q4_0"


def test_peak_rss_is_measured(tmp_path):
    before = bench.peak_rss()
    a = np.ones(96 * 2**20 // 8)   # touch 96 MiB
    assert bench.peak_rss() - before >= 64 * 2**20 or before > 96 * 2**20
    del a


def test_read_bandwidth_is_plausible():
    bw = bench.read_bandwidth(threads=1, mib=64, repeats=3)
    assert 1e8 < bw < 1e13


def test_bench_json_one_record_per_backend_and_format(capsys):
    code, out, _ = run_cli(capsys, "--json", "--backend", "numpy", "--format", "f32,q4_0",
                           "--prompt-len", "8", "--gen-len", "3", "--rounds", "2")
    assert code == 0
    doc = json.loads(out)
    recs = doc["records"]
    assert [(r["backend"], r["format"]) for r in recs] == [("numpy", "f32"), ("numpy", "q4_0")]
    for r in recs:
        assert r["status"] == "ok", r
        assert r["rounds"] == 2 and len(r["decode_runs"]) == 2 and r["prompt_len"] == 8
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0
        assert 10 < r["peak_rss_mib"] < 4096       # measured in the worker, not zero, not absurd
        assert r["decode_limit_tps"] == pytest.approx(doc["machine"]["read_bandwidth_gbs"] * 1e9
                                                      / r["bytes_per_token"], rel=0.01)
        assert r["limit_fraction"] == pytest.approx(r["decode_tps"] / r["decode_limit_tps"])
    assert recs[1]["bytes_per_token"] < recs[0]["bytes_per_token"] / 4    # q4_0 reads ~1/7 of f32
    assert doc["config"]["threads"] >= 1 and doc["machine"]["versions"]["numpy"]


def test_bench_table_and_unknown_backend_skipped_with_reason(capsys):
    code, out, _ = run_cli(capsys, "--backend", "numpy,nosuch", "--format", "f16",
                           "--prompt-len", "4", "--gen-len", "2", "--rounds", "1")
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("numpy") and "f16" in line for line in lines)
    skipped = next(line for line in lines if line.startswith("nosuch"))
    assert "skipped" in skipped and "nosuch" in skipped.split("skipped", 1)[1]
    assert "threads:" in out and "read bandwidth" in out


@pytest.mark.parametrize("args, needle", [(["--prompt-len", "0"], "--prompt-len"),
                                          (["--format", "iq2_xxs"], "iq2_xxs"),   # a type st-sdk cannot write
                                          (["--preset", "huge"], "huge")])
def test_bench_rejects_bad_arguments(capsys, args, needle):
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and needle in err


def test_plot_without_matplotlib_says_how_to_install(capsys, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails as if not installed
    code, _, err = run_cli(capsys, "--backend", "numpy", "--plot", str(tmp_path / "x.png"))
    assert code == 1 and 'pip install -e ".[plot]"' in err


def test_vs_llama_cpp_pairs_each_case_with_the_peer(capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    code, out, _ = run_cli(capsys, "--json", "--backend", "numpy", "--format", "q8_0", "--vs-llama-cpp",
                           "--prompt-len", "8", "--gen-len", "3", "--rounds", "2")
    assert code == 0
    recs = {r["backend"]: r for r in json.loads(out)["records"]}
    peer, ours = recs["llama.cpp"], recs["numpy"]
    assert peer["status"] == "ok", peer["reason"]
    assert peer["bytes_per_token"] == ours["bytes_per_token"]    # the same file
    assert peer["peak_rss_mib"] > 0 and peer["decode_tps"] > 0
    assert ours["vs_llama_cpp_decode"] > 0 and ours["vs_llama_cpp_prefill"] > 0


def test_bench_a_model_file(capsys, tmp_path):
    path = synth.write_model(tmp_path, preset="tiny", formats=("hf", "gguf"), dtype="f16", seed=2)
    code, out, _ = run_cli(capsys, str(path["gguf"]), "--json", "--backend", "numpy",
                           "--prompt-len", "4", "--gen-len", "2", "--rounds", "1")
    (rec,) = json.loads(out)["records"]
    assert code == 0 and rec["status"] == "ok" and rec["format"] == "f16" and rec["source"] == "gguf file"
    code, out, _ = run_cli(capsys, str(path["hf"]), "--json", "--backend", "numpy", "--vs-llama-cpp",
                           "--prompt-len", "4", "--gen-len", "2", "--rounds", "1")
    recs = {r["backend"]: r for r in json.loads(out)["records"]}
    assert recs["numpy"]["status"] == "ok" and recs["numpy"]["format"] == "f16"
    if "llama.cpp" in recs and recs["llama.cpp"]["status"] == "skipped":   # llama.cpp reads GGUF only
        assert ".gguf" in recs["llama.cpp"]["reason"] or "llama-cpp-python" in recs["llama.cpp"]["reason"]


def test_plot_draws_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")
    png = tmp_path / "bench.png"
    code, _, _ = run_cli(capsys, "--backend", "numpy", "--format", "q8_0", "--prompt-len", "4", "--gen-len", "2",
                         "--rounds", "1", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_under_a_memory_budget_reports_the_expert_cache(capsys, tmp_path):
    path = synth.write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=2)["gguf"]
    code, out, _ = run_cli(capsys, str(path), "--json", "--backend", "numpy", "--max-memory", "4GiB",
                           "--prompt-len", "4", "--gen-len", "2", "--rounds", "1")
    doc = json.loads(out)
    (rec,) = doc["records"]
    assert code == 0 and rec["status"] == "ok"
    assert doc["config"]["memory_mode"] == "max_memory=4GiB"
    assert rec["offload"]["bytes_read"] > 0 and "expert cache" in rec["memory_plan"]
    assert rec["offload"]["reader"] == "4 I/O threads"   # NumPy reads experts as stored: no prepared file


def test_bench_format_q4_k_m_quantises_the_f16_file(capsys):
    """A llama.cpp mix is made as people get it: the synthesised F16 file, quantised (llama.cpp's
    quantiser when installed, else st-sdk's), with the mix's per-tensor types."""
    from st_sdk.bench.files import models_dir
    from st_sdk.weights import open_model
    from st_sdk.weights.mixes import tensor_types

    code, out, _ = run_cli(capsys, "--json", "--backend", "numpy", "--format", "q4_k_m",
                           "--prompt-len", "4", "--gen-len", "2", "--rounds", "1")
    assert code == 0
    (rec,) = json.loads(out)["records"]
    assert rec["format"] == "q4_k_m" and rec["status"] == "ok", rec
    mf = open_model(models_dir() / "tiny-q4_k_m-seed0.gguf")
    assert {n: mf.get(n).fmt for n in mf.names} == tensor_types(mf.config, "q4_k_m")
    assert (models_dir() / "tiny-f16-seed0.gguf").exists()
    assert run_cli(capsys, "--format", "q4_k_x")[0] == 1
