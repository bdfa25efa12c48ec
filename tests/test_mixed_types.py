"""Files that mix weight types per tensor: llama.cpp's mixes (`st-sdk quantize --type q4_k_m`), `info`,
memory-budget mode over per-layer types, and backends refusing types they cannot run."""
from __future__ import annotations

import json

import numpy as np
import pytest

import st_sdk
from conftest import rel_err
from st_sdk.cli import main as cli
from st_sdk.errors import InputError, WeightError
from st_sdk.offload import experts as offload_experts
from st_sdk.plugins import hookimpl
from st_sdk.registry import get_registry, reset_registry
from st_sdk.synth import preset_config, write_model
from st_sdk.weights import open_model
from st_sdk.weights.mixes import tensor_types, use_more_bits
from st_sdk_backends.numpy.backend import NumpyBackend

IDS = (np.arange(40) * 37) % 500

#: the issue's table: llama.cpp's types for each mix on the 4B shape (tied embedding, 32 layers, gqa 6)
TABLE = {
    "q4_0": {"q4_0", "q6_k"}, "q4_k_m": {"q4_k", "q6_k"}, "q4_k_s": {"q4_k", "q5_k", "q6_k"},
    "q3_k_m": {"q3_k", "q4_k", "q5_k", "q6_k"}, "q5_k_m": {"q5_k", "q6_k"}, "q6_k": {"q6_k"},
    "q2_k": {"q2_k", "q3_k", "q4_k", "q6_k"}, "iq4_nl": {"iq4_nl", "q5_k", "q6_k"}, "q8_0": {"q8_0"},
}


@pytest.mark.parametrize("mix", TABLE)
def test_mixes_give_the_types_llama_cpp_writes(mix):
    types = tensor_types(preset_config("4b-a0.6b"), mix)
    assert set(types.values()) - {"f32"} == TABLE[mix]
    assert types["token_embd.weight"] == ("q8_0" if mix == "q8_0" else "q6_k")   # tied: the LM head's type
    assert types["blk.3.ffn_gate_inp.weight"] == types["blk.3.attn_norm.weight"] == "f32"


def test_q4_k_m_gives_some_layers_ffn_down_more_bits():
    types = tensor_types(preset_config("4b-a0.6b"), "q4_k_m")
    down = [types[f"blk.{i}.ffn_down_exps.weight"] for i in range(32)]
    assert down == ["q6_k" if use_more_bits(i, 32) else "q4_k" for i in range(32)]
    assert down[:8] == ["q6_k"] * 4 + ["q4_k", "q4_k", "q6_k", "q4_k"] and down.count("q6_k") == 16
    assert {types[f"blk.{i}.ffn_gate_exps.weight"] for i in range(32)} == {"q4_k"}
    pure = tensor_types(preset_config("4b-a0.6b"), "q4_k_m", pure=True)
    assert set(pure.values()) == {"q4_k", "f32"}


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("mixed"), preset="tiny", formats="gguf", dtype="f32", seed=3)["gguf"]


@pytest.fixture(scope="module")
def tiny_q4_k_m(tiny_f32, tmp_path_factory):
    """The tiny preset as q4_k_m: its rows (64, 32) are too short for k-quants, so llama.cpp's fallbacks
    apply (q4_k -> q5_0, q6_k -> q8_0, q5_k -> q5_1): layers 2-3's ffn_down q8_0, layers 0-1's q5_0."""
    out = tmp_path_factory.mktemp("mixed") / "q4_k_m.gguf"
    assert cli(["quantize", str(tiny_f32), str(out), "--type", "q4_k_m"]) == 0
    return out


def test_quantize_writes_the_mix(tiny_f32, tiny_q4_k_m, capsys):
    mf = open_model(tiny_q4_k_m)
    want = tensor_types(mf.config, "q4_k_m")
    assert {n: mf.get(n).fmt for n in mf.names} == want
    assert [want[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)] == ["q5_0", "q5_0", "q8_0", "q8_0"]
    assert mf.file_type == "q4_k_m"
    # the same conversion in memory at load gives the same weights, so the same logits
    got = st_sdk.load(tiny_q4_k_m, backend="numpy").logits(IDS)
    np.testing.assert_array_equal(got, st_sdk.load(tiny_f32, backend="numpy", quantize="q4_k_m").logits(IDS))
    assert rel_err(got, st_sdk.load(tiny_f32, backend="numpy").logits(IDS)) < 0.1


def test_quantize_refuses_a_mix_it_cannot_write(tiny_f32, tmp_path, capsys):
    assert cli(["quantize", str(tiny_f32), str(tmp_path / "x.gguf"), "--type", "iq4_xs"]) == 1
    assert "llama-quantize" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


def test_info_lists_tensor_types_and_bytes(tiny_q4_k_m, capsys):
    assert cli(["info", str(tiny_q4_k_m), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    mf = open_model(tiny_q4_k_m)
    for fmt, v in d["tensor_types"].items():
        tensors = [mf.get(n) for n in mf.names if mf.get(n).fmt == fmt]
        assert v == {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors)}
    assert set(d["tensor_types"]) == {"q5_0", "q8_0", "q5_1", "f32"} and d["file_type"] == "q4_k_m"
    assert cli(["info", str(tiny_q4_k_m)]) == 0
    assert "q8_0 11 tensors" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["numpy", "c", "torch"])   # jax's MoE falls back to numpy as torch's does
def test_mixed_types_per_layer_run_under_a_memory_budget(tiny_q4_k_m, backend, monkeypatch):
    """Experts of different sizes per layer share the cache's slots: same logits as resident."""
    kw = dict(backend=backend, n_threads=1, context=64)
    if backend == "torch":
        pytest.importorskip(backend)
        kw["dtype"] = "float32"   # its MoE falls back to the float32 reference under a budget
    monkeypatch.setattr(offload_experts, "process_baseline_bytes", lambda: 0)
    monkeypatch.setattr(offload_experts, "headroom_bytes", lambda budget: 0)
    want = st_sdk.load(tiny_q4_k_m, **kw).logits(IDS)
    p = st_sdk.load(tiny_q4_k_m, max_memory="64GiB", **kw).memory_plan
    assert p.smallest_expert_bytes < p.expert_bytes   # q5_0 vs q8_0 ffn_down
    budget = p.dense_bytes + p.kv_bytes + p.scratch_bytes + (5 + -(-p.converted_bytes // p.expert_bytes)) * p.expert_bytes
    # converted as read: each layer's parts are read at their own sizes (a prepared file's records are
    # whole pages)
    m = st_sdk.load(tiny_q4_k_m, max_memory=budget, expert_file=False, **kw)
    assert m.memory_plan.slots == 5 and "the smallest is" in m.memory_plan.describe()
    got = m.logits(IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    st = m.offload.stats
    assert st.evictions > 0 and st.bytes_read < st.reads * p.expert_bytes   # small layers read less


class F32Q8(NumpyBackend):
    """A backend that runs a few types only."""
    name = "f32q8"
    formats = ("f32", "f16", "bf16", "q8_0")

    def score(self, hardware, fmt):
        return 1000.0   # preferred whenever it can run the file


class FakePlugin:
    @hookimpl
    def st_sdk_backends(self):
        return [F32Q8]


@pytest.fixture
def with_f32q8(monkeypatch, tmp_path):
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_BLOCK_PLUGINS", "c,torch,jax")
    reset_registry()
    get_registry().register(FakePlugin(), name="fake")
    yield
    reset_registry()


def test_a_backend_is_refused_a_type_it_cannot_run(tiny_q4_k_m, with_f32q8):
    with pytest.raises(WeightError) as e:
        st_sdk.load(tiny_q4_k_m, backend="f32q8")
    msg = str(e.value)
    assert "q4_k_m.gguf: tensor 'token_embd.weight' is stored as q5_0, which backend 'f32q8' cannot run" in msg
    assert "backends that run q5_0: numpy" in msg and "f32q8" not in msg.split("backends that run")[1].split(".")[0]
    assert f"st-sdk quantize {tiny_q4_k_m} OUT.gguf --type q8_0" in msg
    # automatic selection passes it over and says why; a file it can run picks it
    m = st_sdk.load(tiny_q4_k_m)
    assert m.backend.name == "numpy"
    assert "f32q8" in m.selection.explain() and "cannot run q5_0 (tensor 'token_embd.weight')" in m.selection.explain()
    # a priority list falls back to the next that can
    assert st_sdk.load(tiny_q4_k_m, backend="f32q8,numpy").backend.name == "numpy"


def test_a_backend_runs_the_types_it_states(tiny_f32, tmp_path, with_f32q8):
    q8 = tmp_path / "q8.gguf"
    assert cli(["quantize", str(tiny_f32), str(q8), "--type", "q8_0"]) == 0
    assert st_sdk.load(q8).backend.name == "f32q8"


def test_torch_and_jax_report_converting_at_load(tiny_q4_k_m):
    pytest.importorskip("torch")
    m = st_sdk.load(tiny_q4_k_m, backend="torch")
    assert "converts q5_0, q8_0, q5_1 at load" in m.selection.explain()


def test_load_quantize_takes_types_and_mixes(tiny_f32):
    m = st_sdk.load(tiny_f32, backend="numpy", quantize="q5_1")
    assert m.params.layers[0].wq.raw.fmt == "q5_1" and m.params.layers[0].router.raw.fmt == "f32"
    with pytest.raises(InputError, match="q4_k_m"):
        st_sdk.load(tiny_f32, quantize="q4_k_x")
    with pytest.raises(InputError, match="cannot quantise to iq4_nl"):
        st_sdk.load(tiny_f32, quantize="iq4_nl")
