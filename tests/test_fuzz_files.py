"""Fuzzing both loaders: hypothesis mutates tiny GGUF files and HF directories (counts, metadata values and
types, string and array lengths, tensor offsets, types, dims and names, alignment, duplicates,
truncation, bit flips; config.json fields, safetensors entries, index paths, tokenizer files) and each
mutant is loaded, run and generated from on numpy and c in a forked child. No signal, no hang, no raw
exception, no invalid file loaded, every error names the file. Bounded to seconds in the suite
(ST_FUZZ_EXAMPLES mutants, at most ST_FUZZ_SECONDS of loading them: 15 unless set, about 60 mutants on
2 busy cores); tests/fuzz_files.py runs thousands."""
from __future__ import annotations

import os
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from fuzzing import FAILURES, Draw, draw_case, run_case, warm, write_bases  # noqa: E402

SECONDS = float(os.environ.get("ST_FUZZ_SECONDS", "15"))       # the loading children stop after this
EXAMPLES = int(os.environ.get("ST_FUZZ_EXAMPLES", "300"))
_state: dict = {}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = write_bases(tmp_path_factory.mktemp("fuzz-bases"))
    warm(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the isolated runner forks")
@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(data=st.data())
def test_no_mutant_crashes_hangs_or_loads_as_garbage(bases, tmp_path_factory, data):
    case = draw_case(bases, Draw(hypothesis_data=data))
    start = _state.setdefault("start", time.monotonic())
    if case is None or (time.monotonic() - start > SECONDS and not _state.get("failed")):
        return   # a no-op mutation, or the time budget is spent (a failure still replays in full)
    verdicts, reports = run_case(case, tmp_path_factory.mktemp("mutant"), timeout=60)
    m = case[0]
    _state["n"] = _state.get("n", 0) + 1
    bad = [(b, v) for b, v in verdicts if v in FAILURES]
    _state["failed"] = _state.get("failed") or bool(bad)
    assert not bad, f"{m.category}: {m.what} (expected {m.expect}) -> {bad}: {reports}"


def test_the_fuzzer_ran_enough_mutants():
    """The run above is not vacuous (it ran after it when the whole file runs)."""
    if "n" not in _state:
        pytest.skip("the fuzz test did not run in this session")
    assert _state["n"] >= 10
