"""pytest-benchmark suite of st-sdk: `pytest benchmarks/ --benchmark-only`.

Cases are parametrised as BACKEND-FORMAT and grouped per measurement, so pytest-benchmark's table puts
the backends side by side. What is timed is `st_sdk.timing`'s runners (the harness `st-sdk bench`
and the auto-selection use), so the figures agree. Options:

    --st-preset tiny|4b-a0.6b|21b-a3b   model shape (default tiny; bigger ones are written once into
                                        the cache directory, ST_SDK_CACHE_DIR or the user cache)
    --st-backends all|numpy,c,...       backends (default: every registered one)
    --st-formats q4_0,q8_0,f16          weight formats
    --st-threads N                      threads (default: physical cores)
"""
from __future__ import annotations

import pytest

from st_sdk import bench
from st_sdk.hardware import resolve_threads

LLAMA = bench.LLAMA


def pytest_addoption(parser):
    g = parser.getgroup("st-sdk benchmarks")
    g.addoption("--st-preset", default="tiny", help="model shape: tiny (default), 4b-a0.6b or 21b-a3b")
    g.addoption("--st-backends", default="all", help="'all' or a comma list of backends")
    g.addoption("--st-formats", default=",".join(bench.DEFAULT_FORMATS), help="comma list of weight formats")
    g.addoption("--st-threads", type=int, default=None, help="threads (default: physical cores)")


def _opt(config, name):
    return config.getoption(name)


def _backend_status(config) -> dict[str, str | None]:
    """{backend: None if usable here, else why not}, probed once per run (the selection's own probe:
    it imports, runs a smoke op and compares it with the reference)."""
    cache = getattr(config, "_st_backends", None)
    if cache is not None:
        return cache
    from st_sdk.errors import BackendError
    from st_sdk.selection import select_backend

    wanted = _opt(config, "--st-backends")
    names, broken = bench.registered_backends()
    if wanted != "all":
        names, broken = [b.strip() for b in wanted.split(",") if b.strip()], {}
    status = {name: f"plugin failed to load: {err}" for name, err in broken.items()}
    for name in names:
        try:
            select_backend(name, n_threads=_opt(config, "--st-threads"))
            status[name] = None
        except BackendError as e:
            status[name] = str(e)
    config._st_backends = status
    return status


def _gguf(config, fmt: str):
    key = ("_st_gguf", fmt)
    files = config.__dict__.setdefault("_st_files", {})
    if key not in files:
        files[key] = bench.synth_gguf(_opt(config, "--st-preset"), fmt)
    return files[key]


def pytest_generate_tests(metafunc):
    """`case` = (backend, format) for every backend and format; llama.cpp joins when installed and a
    GGUF file exists. `backend` alone for the op micro-benchmarks."""
    config = metafunc.config
    formats = [f.strip() for f in _opt(config, "--st-formats").split(",") if f.strip()]
    if "case" in metafunc.fixturenames:
        params = []
        for name, why in _backend_status(config).items():
            for fmt in formats:
                marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
                params.append(pytest.param((name, fmt), id=f"{name}-{fmt}", marks=marks))
        for fmt in formats:
            why = bench.llama_cpp_missing()
            params.append(pytest.param((LLAMA, fmt), id=f"{LLAMA}-{fmt}",
                                       marks=[pytest.mark.skip(reason=f"{LLAMA}: {why}")] if why else []))
        metafunc.parametrize("case", params)
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", [
            pytest.param(n, id=n, marks=[pytest.mark.skip(reason=f"{n}: {why}")] if why else [])
            for n, why in _backend_status(config).items()])
    if "fmt" in metafunc.fixturenames:
        metafunc.parametrize("fmt", formats)


@pytest.fixture(scope="session")
def preset(pytestconfig) -> str:
    return _opt(pytestconfig, "--st-preset")


@pytest.fixture(scope="session")
def threads(pytestconfig) -> int:
    return resolve_threads(_opt(pytestconfig, "--st-threads"))


@pytest.fixture(scope="session")
def _runners():
    made: dict = {}
    yield made
    made.clear()


@pytest.fixture
def runner(case, preset, threads, pytestconfig, _runners):
    """A timing runner for (backend, format), built once per run (tiny) or per test function (larger
    presets, so that only one model is resident): ours and llama.cpp read the same cached GGUF file."""
    from st_sdk.timing import LlamaRunner, ModelRunner

    if case not in _runners:
        if preset != "tiny":   # big models: one resident at a time (each is reloaded per test function)
            _runners.clear()
            import gc

            gc.collect()
        name, fmt = case
        path = _gguf(pytestconfig, fmt)
        if name == LLAMA:
            from llama_cpp import Llama

            llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                        n_batch=512, logits_all=False, verbose=False)
            _runners[case] = LlamaRunner(llm)
        else:
            import st_sdk

            _runners[case] = ModelRunner(st_sdk.load(str(path), backend=name, n_threads=threads), room=128)
    return _runners[case]


@pytest.fixture(scope="session")
def bandwidth(threads) -> float:
    return bench.read_bandwidth(threads)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved results carry what decides speed: CPU, flags, cores, library versions, bandwidth."""
    threads = resolve_threads(config.getoption("--st-threads", None))
    machine_info["st_sdk"] = bench.machine_info(bench.read_bandwidth(threads))
    machine_info["st_sdk"]["threads"] = threads
    machine_info["st_sdk"]["preset"] = config.getoption("--st-preset", "tiny")
