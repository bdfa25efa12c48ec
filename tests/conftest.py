"""Shared fixtures: tiny synthetic models written to disk once per session (HF and GGUF, same weights)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

#: a short prompt of in-vocabulary ids for the tiny preset (vocab 512); longer than its window (8)
TINY_IDS = [3, 17, 256, 99, 400, 12, 7, 311, 64, 128, 5, 460]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset (seed 0) as an HF directory (single safetensors, f32) holding an f32 GGUF too:
    {"hf": dir, "gguf": file}."""
    from st_sdk.synth import write_model

    return write_model(tmp_path_factory.mktemp("tiny"), preset="tiny", dtype="f32", seed=0)


@pytest.fixture(scope="session")
def tiny_config():
    """The config and tokenizer a synthetic tiny model file carries."""
    from st_sdk.synth import synth_config

    return synth_config("tiny")


@pytest.fixture(scope="session")
def tiny_logits(tiny_config):
    """float32 logits of the in-memory tiny model (seed 0, f32, NumPy reference backend) on TINY_IDS."""
    from st_sdk.loader import build_model
    from st_sdk.synth import random_params

    cfg, _ = tiny_config
    return build_model(cfg, random_params(cfg, 0), backend="numpy").logits(TINY_IDS)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|"""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def automatic_c_variant():
    """For tests that force a C kernel variant: automatic selection is put back afterwards."""
    yield
    from st_sdk.errors import BackendError
    from st_sdk_backends.c import backend as cbackend

    try:
        cbackend.use_variant(None)
    except BackendError:
        pass


def c_variants() -> list[str]:
    """The C kernel variants this CPU runs (generic alone when the compiled module does not load)."""
    from st_sdk.errors import BackendError
    from st_sdk_backends.c import ops as cops

    try:
        _, lib = cops.ffi_lib()
    except BackendError:
        return ["generic"]
    return [v for v, code in cops.VARIANTS.items() if lib.st_cpu_supports(code)]


@pytest.fixture(autouse=True, scope="session")
def _private_st_sdk_cache(tmp_path_factory):
    """Automatic backend selection in tests must not depend on measurements (or smoke verdicts)
    cached in the user's cache directory by earlier runs; tests that care set their own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ST_SDK_CACHE_DIR", str(tmp_path_factory.mktemp("st-sdk-cache")))
    # nor may a budget-mode load start from expert use counts an earlier test's load kept
    # (st_sdk.offload.profile); the tests of that set it back
    mp.setenv("ST_OFFLOAD_PROFILE", "0")
    yield
    mp.undo()


@pytest.fixture
def hf_copy(tiny_dir, tmp_path):
    """A private copy of the tiny HF directory (single safetensors) to damage."""
    d = tmp_path / "model"
    d.mkdir()
    for f in tiny_dir["hf"].iterdir():
        if f.suffix != ".gguf":
            shutil.copy(f, d / f.name)
    return d


def routed_stats(cfg, spec: str, tokens: int, seed: int):
    """Routing statistics (st_sdk.routing.RoutingStats) of a random-weight model of `cfg` written with
    routing=`spec`, recorded over `tokens` random token ids (seeded), 256 at a time."""
    from st_sdk.loader import build_model
    from st_sdk.routing import RoutingRecorder
    from st_sdk.synth import random_weights
    from st_sdk.weights.layout import assemble
    from st_sdk.weights.tensor import WeightTensor

    tensors = {n: WeightTensor(n, "f32", x.shape, x, "<synth>") for n, x in random_weights(cfg, 0, routing=spec)}
    m = build_model(cfg, assemble(cfg, tensors.__getitem__, "hf"), backend="numpy")
    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, tokens)
    with RoutingRecorder(m) as rec:
        for s in range(0, len(toks), 256):
            m.logits(toks[s:s + 256])
    return rec.stats()
