"""Memory-budget mode: experts read on demand into the expert cache give the same logits as resident."""
import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import st_sdk
from smaps import vm_flags
from st_sdk.backend import Param
from st_sdk.errors import InputError, WeightError
from st_sdk.offload import parse_size
from st_sdk.offload import experts as offload_experts
from st_sdk.synth import build_model, write_model

IDS = (np.arange(40) * 37) % 500     # longer than the tiny preset's sliding window (8)
HEADROOM = offload_experts.headroom_bytes   # the real one (the no_baseline fixture sets it to 0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload")
    q8 = write_model(out / "q8", preset="tiny", formats=("gguf",), dtype="q8_0", seed=5)["gguf"]
    hf = write_model(out / "hf", preset="tiny", formats=("hf",), dtype="f32", seed=5, shards=2)["hf"]
    return {"gguf-q8_0": q8, "hf-f32-sharded": hf}


def budget_for(model_path, slots: int, context: int | None = 64, backend: str = "numpy", threads: int = 1) -> int:
    """A budget whose expert cache holds exactly `slots` experts on `threads` threads (a step's scratch
    depends on them; process baseline not counted)."""
    m = st_sdk.load(model_path, backend=backend, n_threads=threads, max_memory="64GiB", context=context)
    p = m.memory_plan
    converted_slots = -(-p.converted_bytes // p.expert_bytes)
    return p.resident_dense_bytes + p.kv_bytes + p.scratch_bytes + (slots + converted_slots) * p.expert_bytes


def computes_as_resident(m, resident) -> None:
    """A budget-mode model's logits of IDS and its first 12 decode steps are the resident model's (within
    float summation order)."""
    want = resident.logits(IDS)
    np.testing.assert_allclose(m.logits(IDS), want, rtol=0, atol=1e-4 * np.abs(want).max())
    s, r = m.session(), resident.session()
    for t in IDS[:12]:
        a, b = s.feed([int(t)]), r.feed([int(t)])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def fake_disk(monkeypatch, **usage) -> None:
    """shutil.disk_usage, as the prepared expert file's writer sees it, reports `usage` (free=, total=)."""
    from types import SimpleNamespace

    from st_sdk.offload import prepared

    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda p: SimpleNamespace(**usage))


@pytest.fixture(autouse=True)
def no_baseline(monkeypatch):
    # the process's own RSS varies between runs, and the headroom grows with the budget; budgets in
    # these tests are about the model alone
    monkeypatch.setattr(offload_experts, "process_baseline_bytes", lambda: 0)
    monkeypatch.setattr(offload_experts, "headroom_bytes", lambda budget: 0)
    monkeypatch.setattr(offload_experts, "runtime_limit", lambda budget: None)   # tested on its own below


@pytest.mark.parametrize("kind", ["gguf-q8_0", "hf-f32-sharded"])
@pytest.mark.parametrize("slots", [4, 32])
def test_offloaded_logits_equal_resident(files, kind, slots):
    path = files[kind]
    want = st_sdk.load(path, backend="numpy").logits(IDS)
    m = st_sdk.load(path, backend="numpy", max_memory=budget_for(path, slots), context=64)
    assert m.memory_plan.slots == slots
    np.testing.assert_array_equal(m.logits(IDS), want)
    # token by token through the cache, past the sliding window
    s = m.session()
    inc = np.stack([s.feed([int(t)]) for t in IDS])
    np.testing.assert_allclose(inc, want, rtol=0, atol=1e-5 * np.abs(want).max())
    st = m.offload.stats
    assert st.bytes_read == st.reads * m.memory_plan.expert_bytes > 0
    assert "expert cache so far: hit rate" in m.selection.explain()
    assert m.selection.to_dict()["offload"]["bytes_read"] == st.bytes_read
    if slots < 8 * 4:   # fewer slots than experts: the cache must have evicted
        assert st.evictions > 0
    assert 0.0 <= st.hit_rate <= 1.0


def test_prefetch_reads_before_the_moe_needs_them(files):
    path = files["gguf-q8_0"]
    budget = budget_for(path, 32)
    on = st_sdk.load(path, backend="numpy", max_memory=budget, context=64)
    off = st_sdk.load(path, backend="numpy", max_memory=budget, context=64, prefetch=False)
    s_on, s_off = on.session(), off.session()
    for t in IDS[:12]:
        np.testing.assert_array_equal(s_on.feed([int(t)]), s_off.feed([int(t)]))
    assert on.offload.stats.prefetch_hits + on.offload.stats.late > 0
    assert off.offload.stats.prefetch_hits == 0 and off.offload.stats.late == 0
    assert off.offload.stats.misses > 0


def test_budget_too_small_says_how_much_is_needed(files):
    with pytest.raises(InputError, match="minimum budget is"):
        st_sdk.load(files["gguf-q8_0"], backend="numpy", max_memory="1KiB")


def test_in_memory_weights_cannot_be_offloaded():
    with pytest.raises(WeightError, match="model file"):
        build_model("tiny", seed=0, max_memory="1GiB")


@pytest.mark.parametrize("text, value", [("1GiB", 2**30), ("512 MiB", 512 * 2**20), ("8GB", 8 * 10**9),
                                         ("1.5g", 1_500_000_000), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "lots", "1 parsec", -5, 0, True])
def test_parse_size_rejects(bad):
    with pytest.raises(InputError, match="max_memory"):
        parse_size(bad)


def test_generate_cli_reports_the_expert_cache(files, capsys):
    from st_sdk.cli import main

    path = files["gguf-q8_0"]
    args = ["generate", str(path), "-p", "hello", "-n", "6", "--backend", "numpy", "--temperature", "0", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    budget = str(budget_for(path, 4, context=None))
    assert main(args + ["--max-memory", budget]) == 0
    offloaded = json.loads(capsys.readouterr().out)
    assert offloaded["token_ids"] == plain["token_ids"]          # same output within the budget
    assert offloaded["offload"]["bytes_read"] > 0 and "expert cache 4 x" in offloaded["offload"]["plan"]
    assert offloaded["offload"]["reader"] == "4 I/O threads"   # no prepared file: converted as read, on threads
    assert "offload" not in plain
    assert main(args[:-1] + ["--max-memory", budget, "--stats"]) == 0
    err = capsys.readouterr().err
    assert "expert cache: hit rate" in err and "reads (4 I/O threads)" in err
    assert main(args + ["--max-memory", budget, "--expert-file", "write"]) == 0
    prepared = json.loads(capsys.readouterr().out)
    assert prepared["token_ids"] == plain["token_ids"] and "read from the prepared file" in prepared["offload"]["plan"]


def test_c_backend_reads_experts_through_the_cache(files):
    """The C backend's MoE runs on the cache's slots (in its own layout) with the same results as resident."""
    from st_sdk.registry import get_registry

    cls = get_registry().backends().get("c")
    if cls is None or not cls().is_available():
        pytest.skip("the C backend is not available here")
    path = files["gguf-q8_0"]
    want = st_sdk.load(path, backend="c", n_threads=1).logits(IDS)
    for slots in (4, 32):   # 4: prefill needs more experts than fit, so they run in groups
        m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, slots, backend="c"), context=64)
        assert m.memory_plan.slots == slots
        assert "moe" not in m.ops.fallbacks and m.ops.forward is None
        got = m.logits(IDS)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
        assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.9
        s = m.session()
        inc = np.stack([s.feed([int(t)]) for t in IDS])
        np.testing.assert_allclose(inc, got, rtol=0, atol=2e-2 * np.abs(want).max())
        assert m.offload.stats.bytes_read > 0


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_batched_steps_under_a_budget_equal_each_sequence_alone(files, backend):
    """The server's engine under max_memory: one step over several sequences reads their experts
    through the cache and gives each sequence what it gets alone."""
    from st_sdk.registry import get_registry

    if backend == "c" and not ((cls := get_registry().backends().get("c")) and cls().is_available()):
        pytest.skip("the C backend is not available here")
    path = files["gguf-q8_0"]
    m = st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget_for(path, 8, backend=backend),
                    context=64)
    assert m.memory_plan is not None and m.ops.forward_batch is None   # experts through the cache
    prompts = [[int(t) for t in IDS[:11]], [int(t) for t in IDS[11:14]], [int(t) for t in IDS[20:27]]]
    solo = [m.session() for _ in prompts]
    want = [s.feed(p) for s, p in zip(solo, prompts)]
    want += [solo[0].feed([7]), solo[1].feed(prompts[2])]
    together = [m.session() for _ in prompts]
    got = m.feed_batch(together, prompts)
    got += m.feed_batch(together[:2], [[7], prompts[2]])   # ragged: one decodes, one takes a chunk
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())
    # the engine on top: two requests at once, greedy, each as it runs alone
    alone = [m.generate(p, max_new_tokens=4, temperature=0, ignore_eos=True).token_ids for p in prompts[:2]]
    assert [r.token_ids for r in m.generate(prompts[:2], max_new_tokens=4, temperature=0, ignore_eos=True)] == alone
    assert m.offload.stats.bytes_read > 0


def test_threads_on_one_budget_model_get_the_serial_results(tmp_path):
    """4 threads on one budget-mode model whose cache holds 9 of 64 experts per layer: generate calls
    (through the engine) and sessions fed directly each give what they give one at a time, with no
    error, and the model keeps working."""
    import threading

    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=2,
                       moe_num_primary_experts=64, moe_num_active_primary_experts=4)["gguf"]
    m = st_sdk.load(path, backend="numpy", n_threads=1, max_memory=budget_for(path, 9, context=128), context=128)
    assert m.memory_plan.slots == 9
    prompts = [[int(x) for x in (np.arange(12) * (7 + i) + 3 * i) % 500] for i in range(12)]
    kw = dict(max_new_tokens=5, temperature=0.8, ignore_eos=True)
    serial = [m.generate(p, seed=i, **kw).token_ids for i, p in enumerate(prompts)]
    serial_logits = [m.session().feed(p) for p in prompts[:4]]
    got, fed, errors = [None] * len(prompts), [None] * 4, []

    def worker(j):
        try:
            fed[j] = m.session().feed(prompts[j])
            for i in range(j, len(prompts), 4):
                got[i] = m.generate(prompts[i], seed=i, **kw).token_ids
        except Exception as e:   # noqa: BLE001 - the test reports every failure
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and got == serial
    for f, w in zip(fed, serial_logits):
        np.testing.assert_array_equal(f, w)
    assert m.generate(prompts[0], seed=0, **kw).token_ids == serial[0]


def test_automatic_choice_under_a_budget_loads_no_framework(files):
    """The automatic choice under max_memory considers only backends that run the MoE from the expert
    cache: torch and jax are not imported into the budget."""
    import subprocess
    import sys

    code = ("import sys, st_sdk; m = st_sdk.load(sys.argv[1], max_memory='64GiB', context=64); "
            "print(m.backend.name, sorted(k for k in ('torch', 'jax') if k in sys.modules)); "
            "print(m.selection.explain())")
    out = subprocess.run([sys.executable, "-c", code, str(files["gguf-q8_0"])], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    first, explain = out.stdout.split("\n", 1)
    assert first.split()[0] in ("c", "numpy") and first.endswith("[]")
    assert "not probed under max_memory" in explain


def test_lfru_keeps_the_expert_used_most_where_lru_evicts_it(tmp_path):
    """One expert used often, then a scan of experts used once: LRU evicts the popular one as soon as
    the scan fills the cache, LFRU evicts a scanned one (the least recent of those used once)."""
    from st_sdk.offload.cache import ExpertCache, Extent

    f = tmp_path / "experts.bin"
    f.write_bytes(bytes(range(64)))

    def locate(layer, e):
        return [Extent(str(f), 3 * e + j, 1) for j in range(3)]

    uses = [0, 0, 0, 0, 1, 2, 3, 4, 0]
    hits, misses = {}, {}
    for policy in ("lru", "lfru"):
        cache = ExpertCache(locate, [[1, 1, 1]], slots=4, io_threads=1, files=(str(f),), policy=policy)
        for e in uses:
            parts = cache.get(0, e)
            assert [int(p[0]) for p in parts] == [3 * e, 3 * e + 1, 3 * e + 2]   # the expert's own bytes
        hits[policy], misses[policy] = cache.stats.hits, cache.stats.misses
        cache.close()
    assert hits == {"lru": 3, "lfru": 4} and misses == {"lru": 6, "lfru": 5}


@pytest.mark.parametrize("policy", ["lru", "lfru"])
def test_every_cache_policy_gives_the_resident_logits(files, policy):
    path = files["gguf-q8_0"]
    want = st_sdk.load(path, backend="numpy").logits(IDS)
    m = st_sdk.load(path, backend="numpy", max_memory=budget_for(path, 8), context=64, cache_policy=policy)
    assert m.offload.policy == policy
    s = m.session()
    inc = np.stack([s.feed([int(t)]) for t in IDS])
    np.testing.assert_allclose(inc, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert m.offload.stats.evictions > 0


def test_unknown_cache_policy_is_refused(files):
    with pytest.raises(InputError, match="cache_policy"):
        st_sdk.load(files["gguf-q8_0"], backend="numpy", max_memory="1GiB", cache_policy="fifo")


def test_a_first_load_plans_what_later_loads_plan(files, tmp_path, monkeypatch):
    """In a new cache directory the first load smoke-tests the backend, preparing a micro model on the
    instance the model then uses; the plan counts only this model's converted weights, so the first
    load's expert cache is as large as every later one's."""
    path = files["gguf-q8_0"]
    budget = budget_for(path, 8, backend="c")
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    plans = [st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64).memory_plan
             for _ in range(2)]
    assert plans[0].converted_bytes == plans[1].converted_bytes
    assert plans[0].slots == plans[1].slots == 8


def test_replay_counts_what_a_budget_model_reads(files):
    """Replaying a recorded routing through a cache of the plan's size reads as many experts as the
    budget-mode model (the C backend's MoE, whose reads replay mirrors) did on the same tokens; a cache
    holding every expert reads each once."""
    from st_sdk.offload.replay import replay
    from st_sdk.routing import RoutingRecorder

    path = files["gguf-q8_0"]
    resident = st_sdk.load(path, backend="numpy")
    with RoutingRecorder(resident) as rec:
        s = resident.session()
        for t in IDS:
            s.feed([int(t)])
    picks = rec.picks()
    assert picks.shape == (len(IDS), resident.config.num_hidden_layers, resident.config.moe_num_active_primary_experts)
    for policy in ("lru", "lfru"):
        for prefetch in (False, True):
            m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 8, backend="c"), context=64,
                            cache_policy=policy, prefetch=prefetch)
            s = m.session()
            for t in IDS:
                s.feed([int(t)])
            want, got = m.offload.stats.reads, replay(picks, 8, policy, prefetch=prefetch).reads
            if prefetch:   # live, a prefetch still in flight is not yet evictable: a few reads differ
                assert abs(got - want) <= 0.05 * want, (policy, got, want)
            else:
                assert got == want, (policy, got, want)
    everything = replay(picks, 10_000, "lfru")
    assert everything.reads == len({(layer, e) for tok in picks for layer, ids in enumerate(tok) for e in ids})
    assert everything.evictions == 0


def test_cache_bounds_on_a_trace_worked_by_hand_and_below_every_policy():
    """The offline optimum (Belady) and the best fixed set in hindsight, on a trace worked by hand, and
    on random routings: no policy replayed reads fewer than the optimum, the fixed set included."""
    from st_sdk.errors import InputError
    from st_sdk.offload.replay import optimal_reads, replay, static_reads

    a, b, c = 0, 1, 2
    trace = np.array([a, b, c, a, b, c]).reshape(6, 1, 1)
    # 2 slots: a, b, c read; c's read evicts b (next asked for after a); a hit; b evicts a (never asked
    # for again); c hit
    assert optimal_reads(trace, 2).tolist() == [1, 1, 1, 0, 1, 0]
    # 1 pinned (a, the first of the equally used) and 1 slot for the rest, which then misses every time
    assert static_reads(trace, 2).tolist() == [1, 1, 1, 0, 1, 1]
    assert replay(trace, 2, "lru").reads == 6
    # a step's picks are held together: with 2 slots, step 1's c stays while d is read, so b (asked for
    # again in step 2) goes even though c is never asked for again
    a, b, c, d, e = range(5)
    held = np.array([[a, b], [c, d], [b, e]]).reshape(3, 1, 2)
    assert optimal_reads(held, 2).tolist() == [2, 2, 2]
    rng = np.random.default_rng(0)
    for skew in (0.0, 1.0):
        share = 1.0 / np.arange(1, 17) ** skew
        picks = np.stack([[rng.choice(16, 2, replace=False, p=share / share.sum()) for _ in range(3)]
                          for _ in range(60)])
        distinct = len({(layer, e) for t in picks for layer, ids in enumerate(t) for e in ids})
        best = optimal_reads(picks, 12).sum()
        assert distinct < best   # each expert read once at least; 12 slots for 48 experts read some again
        for policy in ("lru", "lfru"):
            assert best <= replay(picks, 12, policy).reads
        assert best <= static_reads(picks, 12).sum()
        assert optimal_reads(picks, 48).sum() == static_reads(picks, 48).sum() == distinct
    with pytest.raises(InputError, match="slots"):
        optimal_reads(picks, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_commit_faults_the_slots_pages_in_and_keeps_what_they_hold():
    """The cache's memory is committed in the background once the plan is final: every page becomes
    resident, and bytes an I/O thread already read into a slot stay as they were."""
    from st_sdk.offload.pages import anonymous, commit_in_background, resident_bytes

    nbytes = 64 << 20
    buf = np.frombuffer(anonymous(nbytes), np.uint8)
    buf[:8192] = 7                          # a slot already read into
    before = resident_bytes()
    assert commit_in_background(buf).wait(60)
    grown = resident_bytes() - before
    if grown < nbytes // 4:
        pytest.skip(f"this kernel did not populate ({grown} bytes): MADV_POPULATE_WRITE needs Linux 5.14")
    assert grown >= nbytes - (8 << 20)
    assert (buf[:8192] == 7).all() and not buf[8192:].any()
    assert commit_in_background(buf[:0]).is_set()   # nothing to do: done at once


def test_cache_gives_slots_back_when_the_process_passes_its_limit(files, monkeypatch, caplog):
    """The run-time check before each step: a process found past its limit evicts experts and releases
    their slots' pages, down to the plan's minimum, and still computes the resident logits."""
    from st_sdk.offload import cache as cache_mod

    path = files["gguf-q8_0"]
    want = st_sdk.load(path, backend="c", n_threads=1).logits(IDS[:12])
    monkeypatch.setattr(offload_experts, "runtime_limit", lambda budget: budget)
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 16, backend="c"), context=64)
    cache, stride = m.offload, m.offload._stride
    assert cache.slots == 16 and cache.limit is not None
    rss = {"now": 0}
    # the process's size as the kernel would see it: what it was, less the slots' pages given back
    monkeypatch.setattr(cache_mod, "resident_bytes", lambda: rss["now"] - cache.shrunk * stride)
    s = m.session()
    got = [s.feed([int(t)]) for t in IDS[:4]]                 # within the limit: nothing given back
    assert cache.slots == 16 and cache.shrunk == 0
    rss["now"] = cache.limit + 3 * stride                      # 3 slots' worth over: 3 given back, once
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        got += [s.feed([int(t)]) for t in IDS[4:8]]
    assert cache.slots == 13 and cache.shrunk == 3 and "gave back 3 slots" in caplog.text
    assert cache._committing.is_set()   # the background commit of the slots stops first
    rss["now"] = cache.limit + 10**12                          # far over: never below the minimum
    got += [s.feed([int(t)]) for t in IDS[8:12]]
    assert cache.slots == m.memory_plan.minimum_slots
    assert len(cache.lru) + len(cache.pending) <= cache.slots
    # the C backend reads the cache's file layout, resident it runs repacked weights: 2e-2 as above
    np.testing.assert_allclose(np.stack(got), want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_every_positions_logits_get_room_under_the_limit_before_the_step(files, monkeypatch, caplog):
    """Every position's logits ([tokens, vocabulary] floats: more than a step's activations on a large
    vocabulary) are made room for before each chunk's step: the expert cache gives back the slots they
    would take past the limit (a process that allocated them anyway would be killed at a hard limit),
    and takes them back once there is room again. The logits are the resident ones."""
    from st_sdk.offload import cache as cache_mod

    path = files["gguf-q8_0"]
    want = st_sdk.load(path, backend="c", n_threads=1).logits(IDS[:12])
    monkeypatch.setattr(offload_experts, "runtime_limit", lambda budget: budget)
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 16, backend="c"), context=64)
    cache, stride = m.offload, m.offload._stride
    # the process's size as the kernel would see it: two slots' worth below the limit, less the slots given
    # back (a slot taken back counted as full again)
    rss = {"now": cache.limit - 2 * stride}
    monkeypatch.setattr(cache_mod, "resident_bytes", lambda: rss["now"] - (16 - cache.slots) * stride)
    last = m.session().feed([int(t) for t in IDS[:12]])   # the last position's logits only: no room needed
    assert cache.slots == 16
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        got = m.logits(IDS[:12])
    rows = 12 * m.config.vocab_size * 4   # the rows still to be written, and this chunk's own logits
    given = -(-(2 * rows - 2 * stride) // stride)
    assert cache.slots == 16 - given < 16 and "gave back" in caplog.text and not cache.reserved
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
    np.testing.assert_array_equal(last, got[-1])
    rss["now"] = cache.limit + stride   # the logits let go, the process grown by a slot: all but two taken back
    s = m.session()
    s.feed([int(IDS[0])])
    assert cache.slots == 16 - 2
    rss["now"] = cache.limit - 10**9
    np.testing.assert_allclose(s.feed([int(IDS[1])]), want[1], rtol=0, atol=2e-2 * np.abs(want).max())
    assert cache.slots == 16   # never more than planned


def test_a_chunk_under_a_budget_is_at_most_the_planned_step(files):
    """The plan counts a step of the model's chunk_size tokens; a caller's larger `chunk` is fed in steps
    of that size under a budget (resident, as asked), with the same logits. A chunk that is not a
    positive number of tokens is refused by name, the session unchanged."""
    path = files["gguf-q8_0"]
    steps = {}

    def counted(m, name):
        forward = m._forward

        def step(ids, *a, **kw):
            steps.setdefault(name, []).append(len(ids))
            return forward(ids, *a, **kw)
        m._forward = step
        return m

    resident = counted(st_sdk.load(path, backend="c", n_threads=1, chunk_size=4), "resident")
    budget = counted(st_sdk.load(path, backend="c", n_threads=1, chunk_size=4, context=64,
                                 max_memory=budget_for(path, 12, backend="c")), "budget")
    want = resident.session().feed([int(t) for t in IDS[:10]], all_logits=True, chunk=8)
    got = budget.session().feed([int(t) for t in IDS[:10]], all_logits=True, chunk=8)
    assert steps == {"resident": [8, 2], "budget": [4, 4, 2]}
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
    s = budget.session()
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(InputError, match="chunk"):
            s.feed([int(IDS[0])], chunk=bad)
    assert s.tokens == []


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_lookahead_prefetch_reads_ahead_and_changes_no_result(files, backend):
    """prefetch="lookahead": each layer's input also picks the next layer's experts, whose reads start
    then; the logits stay those of the resident model."""
    path = files["gguf-q8_0"]
    want = st_sdk.load(path, backend=backend, n_threads=1).logits(IDS[:16])
    m = st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget_for(path, 12, backend=backend), context=64,
                    prefetch="lookahead")
    s = m.session()
    got = np.stack([s.feed([int(t)]) for t in IDS[:16]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    st = m.offload.stats
    assert st.ahead > 0 and st.prefetch_hits + st.late > 0
    assert m.offload.lookahead.mode == "always"
    with pytest.raises(InputError, match="prefetch"):
        st_sdk.load(path, backend="numpy", max_memory="1GiB", prefetch="ahead")
    # the default reads ahead only while guesses pay; True is the router's own picks only
    assert st_sdk.load(path, backend="numpy", max_memory="1GiB").offload.lookahead.mode == "auto"
    assert st_sdk.load(path, backend="numpy", max_memory="1GiB", prefetch=True).offload.lookahead is None


def test_guesses_in_one_router_call_guess_and_compute_the_same(files, monkeypatch):
    """On the C backend a layer's router and the guesses it makes for the next layers run in one call
    (route_many, or the layer's own call when the cache holds its experts): the same guesses, for the
    same layers, and the same logits as one call each; a step's layers in one call make the guesses of the
    layers that come back to Python, in the same order."""
    from st_sdk.offload.experts import Lookahead
    from st_sdk_backends.c.backend import CBackend

    path = files["gguf-q8_0"]
    budget = budget_for(path, 12, backend="c", threads=2)
    calls, guessed = [], []
    structs, ahead = CBackend._router_structs, Lookahead.ahead

    def counted(self, routers, k):   # every C call that routes asks for its routers here
        calls.append(len(routers))
        return structs(self, routers, k)

    def recorded(self, layer, guess, distance=1):
        guessed.append((layer, distance, np.ravel(guess).tolist()))
        return ahead(self, layer, guess, distance)

    def run():
        guessed.clear()
        m = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget, context=64, prefetch="lookahead")
        s = m.session()
        return np.stack([s.feed([int(t)]) for t in IDS[:24]]), list(guessed), m.config.num_hidden_layers

    monkeypatch.setattr(Lookahead, "ahead", recorded)
    monkeypatch.setattr(CBackend, "_router_structs", counted)
    monkeypatch.setenv("ST_OFFLOAD_LAYERS", "0")         # a C call a layer
    got, got_guesses, layers = run()
    assert len(calls) == 24 * layers and max(calls) > 1   # one call a layer, guesses included
    monkeypatch.setenv("ST_OFFLOAD_LAYERS", "1")         # a step's layers in one C call (the default)
    fused, fused_guesses, _ = run()
    monkeypatch.setattr(CBackend, "route_many", None)    # a call per router
    want, want_guesses, _ = run()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fused, want)
    assert got_guesses == want_guesses and len(got_guesses) > 24
    # a step's layers in one call: the guesses of the layers that came back to Python (those of a layer run
    # whole in C needed no read), in the same order
    rest = iter(want_guesses)
    assert len(fused_guesses) > 24 and all(g in rest for g in fused_guesses)


def test_a_budget_layer_whose_experts_are_cached_runs_in_its_routers_call(files, monkeypatch):
    """On the C backend a budget layer whose picked experts are all in the cache, and whose guesses need
    no read, runs whole in the C call that routes it (st_layer_cached); one whose guesses need reads
    runs whole in C once they started, without the halves. The logits are those of the path that returns
    to Python between its halves, every pick is counted once either way, and the cache's table of where
    each expert is agrees with what it holds and reads."""
    from st_sdk.offload.experts import PrefetchingRoute
    from st_sdk_backends.c.backend import CBackend

    path = files["gguf-q8_0"]
    budget = budget_for(path, 12, backend="c", threads=2)
    ran, used, ran_whole, in_route = [], PrefetchingRoute.used, PrefetchingRoute.ran_whole, []
    # every layer run whole from resident experts: told to the route at once (a C call a layer) or later
    monkeypatch.setattr(PrefetchingRoute, "used",
                        lambda self, layer, *a: (ran.append(layer), in_route.append(layer), used(self, layer, *a)))
    monkeypatch.setattr(PrefetchingRoute, "ran_whole", lambda self, layer, *a: (ran.append(layer), ran_whole(self, layer, *a)))
    # the layers that started reads, and those of them run in halves (the others ran whole after their reads started)
    counted, picked, halves, finish = [], PrefetchingRoute.picked, [], CBackend._finish_layer
    monkeypatch.setattr(PrefetchingRoute, "picked", lambda self, layer, *a: (counted.append(layer), picked(self, layer, *a)))
    monkeypatch.setattr(CBackend, "_finish_layer", lambda self, *a: (halves.append(a[1]), finish(self, *a)))

    def run(table: bool):
        ran.clear()
        counted.clear()
        halves.clear()
        in_route.clear()
        m = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget, context=64)
        cache = m.offload
        if not table:
            cache.table = None   # the halves, every layer
        s = m.session()
        got = []
        for t in IDS[:32]:
            got.append(s.feed([int(t)]))
            if table:   # slot while resident, -2 while read, else -1
                want = np.full_like(cache.table, -1)
                for key, slot in cache.lru.items():
                    want[key] = slot
                for key in cache.pending:
                    want[key] = -2
                np.testing.assert_array_equal(cache.table, want)
        return np.stack(got), cache.stats.lookups, len(ran), len(counted) - len(halves)

    got, lookups, whole, after_reads = run(True)
    want, want_lookups, none, none_after = run(False)
    assert whole > 0 and none == 0
    # a layer whose own picks are resident but a guess is not: the reads start, then it runs whole
    assert after_reads > 0 and none_after == 0
    np.testing.assert_array_equal(got, want)   # the same arithmetic on the same routing
    assert lookups == want_lookups

    # a prefill of 40 tokens, once the cache holds every expert: each layer whole in one call
    m = st_sdk.load(path, backend="c", n_threads=2, max_memory="64GiB", context=64)
    first = m.logits(IDS)
    ran.clear()
    np.testing.assert_array_equal(m.logits(IDS), first)
    assert len(ran) == m.config.num_hidden_layers
    resident = st_sdk.load(path, backend="c", n_threads=2).logits(IDS)
    np.testing.assert_allclose(first, resident, rtol=0, atol=1e-4 * np.abs(resident).max())


def test_route_many_picks_what_route_picks_for_each_router():
    """CBackend.route_many: each router's top k of each row as `route` gives them (float and Q8_0
    routers alike), also for a list asked for again after a router's prepared weight changed; no
    routers, routers of different widths or a k past a router's rows are refused."""
    from st_sdk.weights.tensor import WeightTensor, quantize
    from st_sdk_backends.c.backend import CBackend

    b = CBackend(n_threads=2)
    b.setup()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)

    def router(rows, fmt="f32", cols=64):
        v = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = WeightTensor("r", fmt, (rows, cols), v if fmt == "f32" else quantize(fmt, v))
        return Param(raw, b.prepare(Param(raw, None), "router"))

    for routers in ([router(16), router(24), router(16)],                # float routers
                    [router(16), router(32, "q8_0"), router(16)]):     # a quantised one among them
        w, ids = b.route_many(x, routers, 4, True)
        assert w.shape == ids.shape == (3, 3, 4)
        for i, r in enumerate(routers):
            rw, rids = b.route(x, r, 4, True)
            np.testing.assert_array_equal(ids[i], rids)
            np.testing.assert_array_equal(w[i], rw)
    with pytest.raises(InputError, match="route_many"):
        b.route_many(x, [routers[0], router(16, cols=32)], 4, True)
    with pytest.raises(InputError, match="route_many"):
        b.route_many(x, routers, 17, True)
    with pytest.raises(InputError, match="route_many"):
        b.route_many(x, [], 4, True)
    # the same list again, after one router's prepared weight was replaced: its new picks
    new = router(32)
    routers[1].value = new.value
    w, ids = b.route_many(x, routers, 4, True)
    rw, rids = b.route(x, new, 4, True)
    np.testing.assert_array_equal(ids[1], rids)
    np.testing.assert_array_equal(w[1], rw)


def test_reading_ahead_turns_on_while_guesses_pay_and_off_when_they_stop():
    from st_sdk.offload.experts import Lookahead

    class Cache:   # what Lookahead sees of an ExpertCache
        def __init__(self):
            self.lru, self.pending, self.started = {(1, 5): 0}, {}, []

        def prefetch_ahead(self, layer, experts):
            self.started.append((layer, list(experts)))

    cache = Cache()
    auto, always = Lookahead(cache, "auto"), Lookahead(Cache(), "always")
    assert not auto.active and always.active   # "auto" first checks a few guesses
    for step in range(12):   # right guesses: every guessed read is needed by the next layer
        guess = [step % 4, 4 + step % 4, 5]
        for la in (auto, always):
            la.ahead(1, guess)
            la.check(1, guess + [9])
    assert auto.active and auto.share_needed == 1.0
    assert cache.started and all(5 not in ids for _, ids in cache.started)   # resident: no read, no count
    for step in range(40):   # then wrong ones: reading ahead stops, though guesses are still checked
        auto.ahead(1, [10, 11])
        auto.check(1, [0, 1])
    assert not auto.active and auto.share_needed < 0.5
    n = len(cache.started)
    auto.ahead(1, [10, 11])
    assert len(cache.started) == n


def test_reading_ahead_is_decided_per_distance():
    """Guesses two layers ahead that stop paying turn reading ahead off at that distance only; the
    next layer's guesses, still right, keep it on there."""
    from st_sdk.offload.experts import Lookahead

    class Cache:
        def __init__(self):
            self.lru, self.pending, self.started = {}, {}, []

        def prefetch_ahead(self, layer, experts):
            self.started.append((layer, list(experts)))

    cache = Cache()
    la = Lookahead(cache, "auto", depth=2)
    for step in range(30):
        real = [step % 5, 5 + step % 3]
        la.ahead(4, real, distance=1)            # the next layer's guess: right
        la.ahead(4, [20, 21, 22], distance=2)    # two layers ahead: wrong
        la.check(4, real)
    assert la.active_at(1) and not la.active_at(2) and la.active
    assert la.share_needed_at(1) == 1.0 and la.share_needed_at(2) == 0.0
    n = len(cache.started)
    la.ahead(6, [30], distance=2)
    la.ahead(6, [31], distance=1)
    assert cache.started[n:] == [(6, [31])]
    # what `st-sdk generate --stats` prints of it
    from types import SimpleNamespace

    from st_sdk.cli.generate import lookahead_line

    line = lookahead_line(SimpleNamespace(lookahead=la, stats=SimpleNamespace(ahead=len(cache.started))))
    assert line == [f"[reads ahead (auto): {len(cache.started)} started; of recent guessed reads, needed: "
                    "1 layer ahead 100%, so on; 2 layers ahead 0%, so off]"]
    assert lookahead_line(SimpleNamespace(lookahead=Lookahead(cache), stats=None)) == []   # nothing guessed yet


def test_guesses_further_ahead_are_made_only_while_nearer_ones_pay():
    """The router is applied for a guess further ahead only while guesses one layer nearer are on: on a
    model whose guesses do not pay, reading ahead costs one router call a layer, not one per distance."""
    from types import SimpleNamespace

    from st_sdk.offload.experts import Lookahead, PrefetchingRoute

    class Cache:
        def __init__(self):
            self.lru, self.pending, self.lookahead = {}, {}, None

        def keep_within(self):
            pass

        def prefetch(self, layer, ids):
            pass

        def prefetch_ahead(self, layer, experts):
            pass

        def hold_reads(self):
            pass

        submit_reads = hold_reads

    routers = [object() for _ in range(6)]
    params = SimpleNamespace(layers=[SimpleNamespace(router=r) for r in routers])
    calls = []

    def route(right, router, k, softmax):   # the step's first call picks; the others guess, right or not
        calls.append(routers.index(router))
        guessing = len(calls) > 1
        return None, np.array([[9 if guessing and not right else routers.index(router) % 3]])

    for right, per_layer in ((False, 1), (True, Lookahead.DEPTH)):
        cache = Cache()
        step = PrefetchingRoute(route, params, cache, True, "auto")
        for _ in range(20):
            for layer in range(len(routers)):
                calls.clear()
                step(right, routers[layer], 1, True)
        assert cache.lookahead.active == right
        calls.clear()
        step(right, routers[0], 1, True)
        assert len(calls) == 1 + per_layer


def test_lfru_victims_chosen_together_are_taken_only_while_unused(tmp_path):
    """LFRU chooses several victims at once on a large cache. A victim is always resident and unheld, and
    no expert used after the batch was chosen is evicted from it. The reads stay within 2% of choosing
    every victim alone."""
    from st_sdk.offload.cache import ExpertCache, Extent

    f = tmp_path / "experts.bin"
    f.write_bytes(bytes(256))
    rng = np.random.default_rng(1)
    stream = rng.zipf(1.3, size=6000) % 200
    reads = {}
    for batch in (1, 16):
        cache = ExpertCache(lambda layer, e: [Extent(str(f), e, 1)] * 3, [[1, 1, 1]] * 2, slots=160,
                            io_threads=1, files=(str(f),), policy="lfru")
        cache.victim_batch = batch
        victim, used_at, chosen_at, bad = cache._victim, {}, {}, []

        def checked_victim():
            before = cache._victims
            got = victim()
            if cache._victims is not before:   # a new batch: note when each of its victims was chosen
                for slot, _ in cache._victims:
                    chosen_at[cache._key_at(slot)] = step
                chosen_at[got] = step
            if got is not None and (got not in cache.lru or got in cache.held or
                                    used_at.get(got, -1) > chosen_at.get(got, step)):
                bad.append(got)
            return got

        cache._victim = checked_victim
        for step, e in enumerate(stream):
            layer = step % 2
            keys = list(dict.fromkeys([int(e), int(stream[step - 5])]))
            cache.get_many(layer, keys)
            for k in keys:
                used_at[(layer, k)] = step
        reads[batch] = cache.stats.reads
        cache.close()
        assert not bad
    assert reads[16] <= reads[1] * 1.02


@pytest.mark.parametrize("dtype, layout, names", [("q4_0", "off", ("repacked", "repacked", "repacked")),
                                                  ("q4_0", "auto", ("repacked", "repacked", "repacked")),
                                                  ("q4_0", "up+down", ("repacked", "row_split", "neuron_major")),
                                                  ("q4_k", "up+down", ("repacked", "file", "neuron_major"))])
def test_c_backend_cache_holds_experts_in_the_loaded_layout(tmp_path, monkeypatch, dtype, layout, names):
    """Under a budget the C backend's experts are converted as they are read to the layout loaded
    experts get (repacked, or sparse ReGLU's), so its MoE runs the same kernels: same results."""
    from st_sdk_backends.c import backend as cbackend

    probe = cbackend.CBackend()
    if not probe.is_available() or not probe._repacking():
        pytest.skip("the C backend repacks only on its SIMD variants")
    monkeypatch.setenv("ST_C_SPARSE_LAYOUT", layout)
    # the sparse layouts need multiples of 64, the k-quants of 256
    width = 256 if dtype == "q4_k" else 128
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype=dtype, seed=3, hidden_size=width,
                       moe_ffn_hidden_size=width // 2 if dtype == "q4_0" else width)["gguf"]
    resident = st_sdk.load(path, backend="c", n_threads=2)
    m = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget_for(path, 6, backend="c", threads=2), context=64)
    lp = m.params.layers[0]
    assert tuple(p.raw.layout.name if p.raw.layout else "file" for p in (lp.gate, lp.up, lp.down)) == names
    if layout == "auto":   # no live shares kept by an earlier run: the repacked layouts
        assert m.backend.describe()["sparse_layout"].startswith("off (auto, under a memory budget")
    computes_as_resident(m, resident)


@pytest.mark.parametrize("backend, layout", [("numpy", "off"), ("c", "off"), ("c", "up+down")])
def test_routing_recorder_under_a_budget_records_what_resident_does(tmp_path, monkeypatch, backend, layout):
    """RoutingRecorder on a budget-mode model: the same picks and ReGLU zero counts as on the resident
    model, its gate weights read from the file (the C backend's cache holds experts repacked, which the
    recorder could not read: TypeError), and the cache's statistics count the MoE's uses only."""
    from st_sdk.registry import get_registry
    from st_sdk.routing import RoutingRecorder

    cls = get_registry().backends().get(backend)
    if cls is None or not cls().is_available():
        pytest.skip(f"the {backend} backend is not available here")
    monkeypatch.setenv("ST_C_SPARSE_LAYOUT", layout)
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=3,
                       hidden_size=128, moe_ffn_hidden_size=64)["gguf"]   # multiples of 64: sparse layouts

    def load(**kw):
        return st_sdk.load(path, backend=backend, n_threads=1, context=64, **kw)

    def run(m):
        m.logits(IDS)
        s = m.session()
        for t in IDS[:12]:
            s.feed([int(t)])

    def record(m):
        with RoutingRecorder(m) as rec:
            run(m)
        return rec

    want = record(load())
    budget = {"max_memory": budget_for(path, 6, backend=backend), "prefetch": False}
    m = load(**budget)
    got = record(m)
    np.testing.assert_array_equal(got.picks(), want.picks())
    np.testing.assert_array_equal(got.zero, want.zero)
    np.testing.assert_array_equal(got.neurons, want.neurons)
    unrecorded = load(**budget)
    run(unrecorded)
    assert m.offload.stats.lookups == unrecorded.offload.stats.lookups


def _expert_file(tmp_path, size: int = 3 * 4096 + 777):
    """A file of distinct bytes, and extents at offsets no block boundary lines up with (the last one
    ends at the end of the file, mid-block)."""
    from st_sdk.offload.cache import Extent

    f = tmp_path / "experts.bin"
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    f.write_bytes(data.tobytes())
    parts = [(32, 1000), (5000, 4100), (size - 2345, 2345)]
    return str(f), data, (lambda layer, e: [Extent(str(f), off, n) for off, n in parts]), [[n for _, n in parts]]


@pytest.mark.parametrize("direct", [True, False])
def test_cache_reads_the_same_bytes_with_and_without_o_direct(tmp_path, direct):
    from st_sdk.offload.cache import ExpertCache

    path, data, locate, sizes = _expert_file(tmp_path)
    cache = ExpertCache(locate, sizes, slots=2, io_threads=2, files=(path,), direct=direct)
    try:
        got = cache.get(0, 0)
        for (ext, part) in zip(locate(0, 0), got):
            np.testing.assert_array_equal(part, data[ext.offset:ext.offset + ext.nbytes])
        assert (cache._direct_fds.get(path) is not None) == (direct and hasattr(__import__("os"), "O_DIRECT"))
    finally:
        cache.close()


def test_cache_reads_through_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch):
    """A filesystem without O_DIRECT (tmpfs refuses it at open; some refuse the read): the same bytes,
    read the buffered way."""
    import errno
    import os

    from st_sdk.offload import cache as cache_mod

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    path, data, locate, sizes = _expert_file(tmp_path)
    real_open, real_preadv = os.open, os.preadv
    for refuse in ("open", "read"):
        def fake_open(p, flags, *a, _refuse=refuse):
            if flags & os.O_DIRECT and _refuse == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(p, flags, *a)

        direct_fds = set()

        def fake_preadv(fd, bufs, off):
            if fd in direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, bufs, off)

        monkeypatch.setattr(cache_mod.os, "open", fake_open)
        monkeypatch.setattr(cache_mod.os, "preadv", fake_preadv)
        cache = cache_mod.ExpertCache(locate, sizes, slots=2, io_threads=1, files=(path,), direct=True)
        if refuse == "read":
            direct_fds.add(cache._direct_fds[path])
        try:
            for ext, part in zip(locate(0, 0), cache.get(0, 0)):
                np.testing.assert_array_equal(part, data[ext.offset:ext.offset + ext.nbytes])
            assert cache._direct_fds[path] is None
        finally:
            cache.close()


@pytest.mark.parametrize("direct", [True, False])
def test_truncated_file_is_a_clear_error_either_way(tmp_path, direct):
    from st_sdk.offload.cache import ExpertCache

    path, data, locate, sizes = _expert_file(tmp_path)
    cache = ExpertCache(locate, sizes, slots=2, io_threads=1, files=(path,), direct=direct)
    try:
        os_truncate = __import__("os").truncate
        os_truncate(path, data.size - 100)
        with pytest.raises(WeightError, match="short read of expert .* is the file truncated"):
            cache.get(0, 0)
    finally:
        cache.close()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_framework_backends_run_their_moe_on_the_cache(tmp_path, backend):
    """Named under a budget, torch and jax run their own MoE on the cache's slots, each expert
    dequantised to their compute dtype as it is read (not on the NumPy reference): the resident
    logits, prefill and token by token, with a cache smaller than a prefill's experts."""
    from st_sdk.registry import get_registry

    cls = get_registry().backends().get(backend)
    if cls is None or not cls().is_available():
        pytest.skip(f"{backend} is not installed")
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=5)["gguf"]
    want = st_sdk.load(path, backend=backend, n_threads=1).logits(IDS)
    m = st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget_for(path, 6, backend=backend), context=64)
    assert m.memory_plan.slots == 6 and "moe" not in m.ops.fallbacks
    lay = m.params.layers[0].gate.raw.layout
    assert lay.dtype == m.backend.dtype and m.memory_plan.expert_bytes == 3 * lay.nbytes   # slots hold floats
    tol = 1e-5 if backend == "torch" else 2e-3   # jax: its resident matmuls widen packed chunks
    np.testing.assert_allclose(m.logits(IDS), want, rtol=0, atol=tol * np.abs(want).max())
    s = m.session()
    inc = np.stack([s.feed([int(t)]) for t in IDS[:12]])
    np.testing.assert_allclose(inc, want[:12], rtol=0, atol=tol * np.abs(want).max())
    assert m.offload.stats.evictions > 0


def _c_repacking():
    from st_sdk_backends.c import backend as cbackend

    probe = cbackend.CBackend()
    return probe.is_available() and probe._repacking()


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_budget_layer_computes_what_the_resident_layer_does(tmp_path, dtype, threads):
    """Under a budget the C backend runs each layer fused around the cache (route, attention, then the
    picked experts straight from their slots): the logits are the resident model's, bit for bit, and
    the sparse ReGLU counters count its tokens. While I/O threads read its experts it runs on a pool of
    its own, whose workers spin less for the next job (BUDGET_IDLE_SPIN); the resident model in the same
    process keeps the default."""
    from st_sdk_backends.c import backend as cbackend

    if not _c_repacking():
        pytest.skip("the C backend runs the loaded layout only on its SIMD variants")
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype=dtype, seed=3,
                       hidden_size=128, moe_ffn_hidden_size=64)["gguf"]
    resident = st_sdk.load(path, backend="c", n_threads=threads)
    m = st_sdk.load(path, backend="c", n_threads=threads,
                    max_memory=budget_for(path, 12, backend="c", threads=threads), context=64)
    assert m.ops.layer is not None and m.ops.layers is not None and m.ops.forward is None
    np.testing.assert_array_equal(m.logits(IDS[:6]), resident.logits(IDS[:6]))
    m.backend.sparsity(reset=True)
    s, r = m.session(), resident.session()
    for t in IDS[:16]:
        m.backend.stage_seconds(reset=True)
        got = s.feed([int(t)])
        stages = m.backend.stage_seconds()   # each layer's two C calls time its stages; the head is not in them
        assert stages.pop("head") == 0 and all(v > 0 for v in stages.values()), stages
        np.testing.assert_array_equal(got, r.feed([int(t)]))
    counted = m.backend.sparsity()
    assert counted is not None and counted["tokens"] >= 16 and 0 < counted["live_fraction"] < 1
    assert m.offload.stats.reads > 0
    spin = cbackend.BUDGET_IDLE_SPIN if m.offload.reads_on_threads else None
    assert m.backend._idle_spin == spin and resident.backend._idle_spin is None
    assert m.backend._lib()[2] == cbackend.get_pool(threads, spin)
    assert (m.backend._lib()[2] != cbackend.get_pool(threads)) == (spin is not None)


def test_c_budget_step_runs_its_resident_layers_in_one_call_and_surfaces_errors(tmp_path, monkeypatch):
    """A budget decode step's layers go to C in one call (st_layers_cached): the layers whose experts
    the cache holds run there whole, only the others come back to Python to start their reads, and
    every layer's uses are counted as layer by layer. A prompt's chunk longer than LAYERS_AT_ONCE_TOKENS
    goes layer by layer. An error raised while C waits on Python (a read that fails) reaches the caller
    as itself, and the model decodes right afterwards."""
    from st_sdk.offload.experts import PrefetchingRoute
    from st_sdk_backends.c import backend as cbackend

    if not _c_repacking():
        pytest.skip("the C backend runs the loaded layout only on its SIMD variants")
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    budget = budget_for(path, 12, backend="c", threads=2)
    resident = st_sdk.load(path, backend="c", n_threads=2)
    m = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget, context=64)
    layers = m.config.num_hidden_layers
    calls = {"offloaded_layer": 0, "_after_routing": 0}
    for name in calls:
        def counting(self, *a, _f=getattr(cbackend.CBackend, name), _name=name, **kw):
            calls[_name] += 1
            return _f(self, *a, **kw)
        monkeypatch.setattr(cbackend.CBackend, name, counting)
    prompt = IDS[:cbackend.LAYERS_AT_ONCE_TOKENS + 1]
    s, r = m.session(), resident.session()
    np.testing.assert_array_equal(s.feed(prompt), r.feed(prompt))
    assert calls["offloaded_layer"] == layers   # the long chunk: layer by layer
    hits = m.offload.stats.hits
    for t in IDS[10:34]:
        np.testing.assert_array_equal(s.feed([int(t)]), r.feed([int(t)]))
    assert calls["offloaded_layer"] == layers   # decode steps: every layer in the step's one call
    assert 0 < calls["_after_routing"] < 24 * layers   # some layers ran whole in C, some started reads
    # every pick of every layer counted: k uses a layer and token, as hits or as experts read
    assert m.offload.stats.hits - hits > 24 * layers * m.config.moe_num_active_primary_experts // 2

    picked = PrefetchingRoute.picked

    def failing(self, layer, *a, **kw):
        if layer == layers - 1:
            raise OSError(5, "Input/output error")
        return picked(self, layer, *a, **kw)

    monkeypatch.setattr(PrefetchingRoute, "picked", failing)
    with pytest.raises(OSError, match="Input/output"):
        for t in IDS[34:40]:   # until the last layer starts a read
            s.feed([int(t)])
    monkeypatch.setattr(PrefetchingRoute, "picked", picked)
    s, r = m.session(), resident.session()
    for t in IDS[:12]:
        np.testing.assert_array_equal(s.feed([int(t)]), r.feed([int(t)]))


def test_c_counts_a_layers_uses_as_the_cache_does(tmp_path, monkeypatch):
    """The uses of the layers a budget step runs whole in C are counted there (csrc st_count_uses, on the
    cache's arrays: ExpertCache.use_arrays): the use counts, each slot's last use and its expert's uses,
    the read-ahead marks, the hits and the agings come out as ExpertCache.count_used makes them, and so
    do the victims chosen next; picks out of range or not resident are refused, changing nothing."""
    from st_sdk.offload import uses as uses_mod
    from st_sdk.offload.cache import ExpertCache, Extent
    from st_sdk_backends.c.backend import CBackend
    from st_sdk_backends.c.ops import ffi_lib

    if not CBackend().is_available():
        pytest.skip("the C backend is not built")
    ffi, lib = ffi_lib()
    monkeypatch.setattr(uses_mod, "AGE_EVERY", 2)   # an aging every 24 uses
    f = tmp_path / "experts.bin"
    f.write_bytes(bytes(256))
    caches, aged = [], [[], []]
    for i in range(2):
        c = ExpertCache(lambda layer, e: [Extent(str(f), e, 1)] * 3, [[1, 1, 1]] * 2, slots=12, io_threads=1,
                        files=(str(f),), policy="lfru", experts=40)
        c.keep_counts = (lambda log: lambda: log.append(1))(aged[i])
        caches.append(c)
    by_python, by_c = caches
    rng = np.random.default_rng(1)

    def drained(c):   # every read finished and settled, so both caches see the same
        for _, fut in list(c.pending.values()):
            fut.result()
        c._settle()

    def same():
        for name in ("uses", "_prefetched", "_seq", "_slot_uses", "_slot_layer", "_slot_expert", "table"):
            np.testing.assert_array_equal(getattr(by_c, name), getattr(by_python, name), err_msg=name)
        np.testing.assert_array_equal(by_c._counts[:2], by_python._counts[:2])
        assert by_c.stats.as_dict() | {"stall_s": 0} == by_python.stats.as_dict() | {"stall_s": 0}
        assert set(by_c.lru) == set(by_python.lru) and by_c._victims == by_python._victims

    popular = rng.zipf(1.5, size=900) % 40
    for i in range(300):
        layer, picks = i % 2, [int(e) for e in popular[3 * i:3 * i + 3]]
        ahead = [int(e) for e in rng.integers(0, 40, 2)] if i % 5 == 0 else []
        for c in caches:
            c.get_many(layer, list(dict.fromkeys(picks)))
            c.prefetch(layer, ahead)   # read ahead: a use of these is a prefetch hit
            drained(c)
        resident = sorted(e for (lay, e) in by_python.lru if lay == layer)
        own = [int(e) for e in rng.choice(resident, size=min(4, len(resident)))]   # repeats counted once
        by_python.count_used(layer, own)
        ids = np.array(own, np.int64)
        rc = lib.st_count_uses(CBackend._uses_struct(by_c), layer, ffi.cast("int64_t *", ids.ctypes.data), len(own),
                               ffi.cast("int32_t *", by_c.table[layer].ctypes.data), 2, len(by_c.buffer))
        assert rc == 0
        by_c.counted()
        same()
    assert len(aged[0]) == len(aged[1]) > 3 and by_python.stats.prefetch_hits > 0
    absent = next(e for e in range(40) if by_c.table[0, e] < 0)
    before = by_c.uses.copy()
    for bad in ([absent], [40], [-1]):
        ids = np.array(bad, np.int64)
        rc = lib.st_count_uses(CBackend._uses_struct(by_c), 0, ffi.cast("int64_t *", ids.ctypes.data), 1,
                               ffi.cast("int32_t *", by_c.table[0].ctypes.data), 2, len(by_c.buffer))
        assert rc == -4   # ST_EIDS
    np.testing.assert_array_equal(by_c.uses, before)
    for c in caches:
        c.close()


@pytest.mark.parametrize("strided", [False, True])
def test_c_budget_layers_read_a_refilled_positions_array_afresh(tmp_path, strided):
    """A step's layers check its positions once (the C backend keeps the array its first layer
    checked): a caller that refills one positions array between steps, contiguous or a strided view,
    still gets each step's own positions in every layer, as a session's steps do."""
    if not _c_repacking():
        pytest.skip("the C backend runs the loaded layout only on its SIMD variants")
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 12, backend="c"), context=64)
    assert m.ops.layer is not None
    cache, pos, want = m.new_cache(16), np.zeros(2, np.int64)[::2] if strided else np.zeros(1, np.int64), m.session()
    for t, tok in enumerate(IDS[:6]):
        pos[0] = t
        got = m._forward(np.array([tok], np.int64), pos, cache, last_only=True)
        np.testing.assert_array_equal(got[0], want.feed([int(tok)]))


def test_c_layer_part_refuses_experts_it_was_not_given(tmp_path):
    """The expert half of a budget layer runs only on experts whose slots it was handed: a pick whose
    pointer is absent, or out of range, is an error code, not a read of freed memory."""
    from st_sdk_backends.c.ops import ffi_lib, ptr

    if not _c_repacking():
        pytest.skip("the C backend runs the loaded layout only on its SIMD variants")
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 12, backend="c"), context=64)
    s = m.session()
    s.feed([5])
    ffi, lib = ffi_lib()
    (_, (struct, _, _)), = [v for k, v in m.backend._layer_structs.items() if k[1] == 0]
    assert all(struct.layers[0].gate.experts[e] == ffi.NULL for e in range(m.config.moe_num_primary_experts))
    h = np.zeros((1, m.config.hidden_size), np.float32)
    pos = np.array([1], np.int64)
    k = m.config.moe_num_active_primary_experts
    w = np.full((1, k), 1.0 / k, np.float32)
    for ids in (np.arange(k, dtype=np.int64)[None], np.full((1, k), 10_000, np.int64)):
        rc = lib.st_layer_part(ffi.NULL, struct, 0, s.cache.layers[0].kv, ptr(ffi, "float *", h),
                               ptr(ffi, "int64_t *", pos), 1, 2, ptr(ffi, "int64_t *", ids), ptr(ffi, "float *", w))
        assert rc == -4   # ST_EIDS
    assert np.all(h == 0)


def test_lfru_evicts_the_least_used_expert_however_recent(tmp_path):
    """At every eviction the victim is, among all resident unheld experts (none set aside for being
    recent), the one used least, the least recent of equals (the policy's definition, checked against
    a direct scan of the cache's state)."""
    from st_sdk.offload.cache import ExpertCache, Extent

    f = tmp_path / "experts.bin"
    f.write_bytes(bytes(256))
    cache = ExpertCache(lambda layer, e: [Extent(str(f), e, 1)] * 3, [[1, 1, 1]] * 2, slots=12, io_threads=1,
                        files=(str(f),), policy="lfru")
    victim, checked = cache._victim, []

    def checked_victim():
        candidates = [key for key in cache.lru if key not in cache.held]
        want = min(candidates, key=lambda key: cache.uses[key]) if candidates else None
        got = victim()
        checked.append(got == want)
        return got

    cache._victim = checked_victim
    rng = np.random.default_rng(0)
    popular = rng.zipf(1.5, size=3000) % 40   # skewed: some experts far more used than others
    for i, e in enumerate(popular):
        layer = i % 2
        if i % 7 == 0:
            cache.prefetch(layer, [int(e), int(popular[i - 1])])
        cache.get_many(layer, list(dict.fromkeys([int(e), int(popular[i - 3])])))
    cache.close()
    assert len(checked) > 1000 and all(checked)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's RssAnon (Linux)")
def test_slots_given_back_are_returned_to_the_system(tmp_path):
    """The slots are this process's own anonymous memory, so the pages of a slot given back by the
    run-time check leave the process (in shared memory they would stay allocated, and counted)."""
    from st_sdk.offload.cache import ExpertCache, Extent

    def rss_anon() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))

    part = 1 << 20
    f = tmp_path / "experts.bin"
    f.write_bytes(np.random.default_rng(0).integers(0, 255, 3 * part * 16, dtype=np.uint8).tobytes())
    cache = ExpertCache(lambda layer, e: [Extent(str(f), (3 * e + j) * part, part) for j in range(3)],
                        [[part] * 3], slots=16, io_threads=2, files=(str(f),))
    before = rss_anon()
    for e in range(16):
        cache.get(0, e)
    filled = rss_anon()
    assert filled - before >= 0.9 * 16 * 3 * part   # the slots' pages are the process's anonymous memory
    cache.limit, cache.minimum_slots = 0, 4
    assert cache.keep_within(rss=lambda: 12 * cache._stride) == 12
    assert filled - rss_anon() >= 0.9 * 12 * 3 * part
    cache.close()


@pytest.mark.parametrize("reader", ["io_uring", "threads", "io_uring failing"])
def test_prepared_file_reads_give_the_resident_logits_whoever_reads(tmp_path, monkeypatch, reader):
    """The prepared file's direct reads go through io_uring where the kernel allows it, else (or with
    ST_OFFLOAD_URING=0) through the I/O threads; pieces the ring fails (here every one, EIO) are read
    again the threads' way. The logits are the resident model's each time. The C pool's workers spin
    less for their next job only while I/O threads read (they need a core then)."""
    import errno

    from st_sdk.offload import uring
    from st_sdk_backends.c import backend as cbackend

    if reader != "threads" and uring.Ring.open() is None:
        pytest.skip("io_uring is unavailable here")
    if reader == "threads":
        monkeypatch.setenv("ST_OFFLOAD_URING", "0")
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=3)["gguf"]
    resident = st_sdk.load(path, backend="c", n_threads=1)
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 12, backend="c"), context=64,
                    expert_file=True)
    ring = m.offload._ring
    assert m.offload.prepared is not None and (ring is None) == (reader == "threads")
    assert m.offload.reader == ("4 I/O threads" if reader == "threads" else "io_uring")
    if reader == "io_uring failing":
        reap = ring.reap

        def failing():
            n = reap()
            for tag in ring.results:
                ring.results[tag] = -errno.EIO
            return n

        monkeypatch.setattr(ring, "reap", failing)
    read_again = []
    read_prepared = m.offload._read_prepared
    monkeypatch.setattr(m.offload, "_read_prepared", lambda *a: read_again.append(a) or read_prepared(*a))
    s, r = m.session(), resident.session()
    for t in IDS[:24]:
        np.testing.assert_array_equal(s.feed([int(t)]), r.feed([int(t)]))
    stats = m.offload.stats
    assert stats.reads > 0 and stats.evictions > 0 and stats.bytes_read >= stats.reads * m.offload.bundle_bytes
    assert (len(read_again) == 0) == (reader == "io_uring")   # the ring read every piece itself
    assert m.backend._idle_spin == (cbackend.BUDGET_IDLE_SPIN if reader == "threads" else None)
    m.offload.close()
    assert m.offload._ring is None


def test_a_cache_dropped_without_close_closes_its_files(tmp_path):
    """A budget model let go (nobody calls close()) leaves no file or io_uring descriptor open."""
    import gc

    from st_sdk.offload.cache import ExpertCache

    path = tmp_path / "experts.bin"
    path.write_bytes(b"\0" * 4096)
    cache = ExpertCache(lambda layer, e: [], [[1, 1, 1]], 4, files=(str(path),))
    fds = [*cache._fds.values(), *(fd for fd in cache._direct_fds.values() if fd is not None)]
    assert fds
    del cache
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_prepared_expert_file_gives_the_resident_logits(tmp_path, monkeypatch, backend):
    """expert_file=True writes every expert once in the backend's layout and reads each back in one
    read straight into its slot; "auto" finds it again on the next load, False does not use it; the
    logits stay the resident model's."""
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=3)["gguf"]
    resident = st_sdk.load(path, backend=backend, n_threads=1)
    budget = budget_for(path, 12, backend=backend)
    m = st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget, context=64, expert_file=True)
    written = m.memory_plan.expert_file
    assert written is not None and written.parent == tmp_path / "cache" / "experts" and written.exists()
    assert "read from the prepared file" in m.memory_plan.describe()
    assert [p.name for p in written.parent.iterdir()] == [written.name]   # no partial file left
    s, r = m.session(), resident.session()
    for t in IDS[:24]:
        np.testing.assert_array_equal(s.feed([int(t)]), r.feed([int(t)]))
    assert m.offload.stats.reads > 0 and m.offload.stats.evictions > 0
    again = st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget, context=64)   # "auto"
    assert again.memory_plan.expert_file == written
    np.testing.assert_array_equal(again.logits(IDS[:6]), resident.logits(IDS[:6]))
    off = st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget, context=64, expert_file=False)
    assert off.memory_plan.expert_file is None and off.offload.prepared is None


def test_auto_writes_the_prepared_file_where_it_saves_a_conversion(tmp_path, monkeypatch, caplog):
    """expert_file="auto" (the default): a backend that converts the experts it reads gets the file
    written on its first load (a warning names it and its size), and later loads read it without
    writing again; a backend that reads them as stored gets none, and neither does a disk that would
    keep less than a tenth of itself free, or 16 GiB where that is less (a warning says why: decoding
    is slower without it)."""
    from st_sdk.offload import prepared

    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    fake_disk(monkeypatch, free=90 * 2**30, total=100 * 2**30)   # a roomy disk, whatever this machine's has free
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=5)["gguf"]
    resident = st_sdk.load(path, backend="c", n_threads=1)
    budget = budget_for(path, 12, backend="c")
    load = lambda backend="c": st_sdk.load(path, backend=backend, n_threads=1, max_memory=budget, context=64)  # noqa: E731
    with caplog.at_level("INFO", logger="st_sdk.offload"):
        m = load()
    if all(lay is None for lays in m.offload.layouts for lay in lays):
        pytest.skip("this C build reads the experts as stored (no SIMD variant): nothing to convert")
    written = m.memory_plan.expert_file
    assert written is not None and written.exists()
    assert str(written) in caplog.text and "expert_file=False" in caplog.text
    np.testing.assert_array_equal(m.logits(IDS[:8]), resident.logits(IDS[:8]))
    stamp = written.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger="st_sdk.offload"):
        again = load()
    assert again.memory_plan.expert_file == written and written.stat().st_mtime_ns == stamp
    assert "writing" not in caplog.text
    as_stored = st_sdk.load(path, backend="numpy", max_memory=budget_for(path, 12), context=64)
    assert as_stored.memory_plan.expert_file is None   # as stored: no file of its own

    written.unlink()
    need = prepared.HEADER + prepared.data_bytes(prepared.signature(m.offload, m.config.moe_num_primary_experts))
    fake_disk(monkeypatch, free=need + 5 * 2**30, total=100 * 2**30)   # 5% of a 100 GiB disk left after writing
    caplog.clear()
    with caplog.at_level("INFO", logger="st_sdk.offload"):
        short = load()
    assert short.memory_plan.expert_file is None and not written.exists()
    assert "10.00 GiB of the disk is kept free (a tenth of it, at most 16 GiB)" in caplog.text
    assert any(r.levelname == "WARNING" and "slows decoding" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(short.logits(IDS[:8]), resident.logits(IDS[:8]))
    # on a large disk 16 GiB is kept, not a tenth: 5% of a 1,000 GiB disk left after writing is enough
    fake_disk(monkeypatch, free=need + 50 * 2**30, total=1000 * 2**30)
    large = load()
    assert large.memory_plan.expert_file == written and written.exists()
    np.testing.assert_array_equal(large.logits(IDS[:8]), resident.logits(IDS[:8]))
    assert prepared.auto_free_bytes(100 * 2**30) == 10 * 2**30 and prepared.auto_free_bytes(2**20) == prepared.FREE_MARGIN


def test_a_prepared_file_in_new_layouts_replaces_the_models_old_one_where_the_disk_lacks_room_for_both(
        tmp_path, monkeypatch, caplog):
    """A load whose layouts differ from those of the model's prepared file (an earlier load's, before the
    live shares it kept chose new ones) needs a new file; where the disk has room for it only without
    the old one, the old one is removed (a warning names it) and the new one written; where it lacks
    room even then, both are left and the experts are converted as they are read."""
    from st_sdk.offload import prepared

    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "0")
    fake_disk(monkeypatch, free=90 * 2**30, total=100 * 2**30)
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q4_0", seed=5)["gguf"]
    resident = st_sdk.load(path, backend="c", n_threads=1)
    budget = budget_for(path, 12, backend="c")

    def load(layout):
        monkeypatch.setenv("ST_C_SPARSE_LAYOUT", layout)
        return st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64)

    old = load("off")
    if old.memory_plan.expert_file is None:
        pytest.skip("this C build reads the experts as stored (no SIMD variant): nothing to convert")
    old_file = old.memory_plan.expert_file
    new = load("up+down")
    new_file = new.memory_plan.expert_file
    assert new_file is not None and new_file != old_file and old_file.exists()   # room for both: both kept
    need = new_file.stat().st_size
    new_file.unlink()

    # room for the new file only once the old one is gone: 10 GiB of the 100 GiB disk is kept free
    fake_disk(monkeypatch, free=need + 10 * 2**30 - old_file.stat().st_size // 2, total=100 * 2**30)
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        m = load("up+down")
    assert m.memory_plan.expert_file == new_file and new_file.exists() and not old_file.exists()
    assert f"removed {old_file}" in caplog.text
    np.testing.assert_allclose(m.logits(IDS[:8]), resident.logits(IDS[:8]), rtol=0,
                               atol=1e-4 * np.abs(resident.logits(IDS[:8])).max())

    # no room even without the other file: it stays, and the experts are converted as they are read
    caplog.clear()
    fake_disk(monkeypatch, free=need + 5 * 2**30, total=100 * 2**30)
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        short = load("off")
    assert short.memory_plan.expert_file is None and new_file.exists() and "removed" not in caplog.text
    assert "slows decoding" in caplog.text


def test_prepared_expert_file_follows_the_model_file(tmp_path, monkeypatch, caplog):
    """A changed model file, a damaged prepared file or a disk without room: the experts are converted
    as they are read (a warning says why when one was asked for), never read from a stale file."""
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    want = st_sdk.load(path, backend="numpy").logits(IDS[:6])
    budget = budget_for(path, 12)
    load = lambda ef: st_sdk.load(path, backend="numpy", max_memory=budget, context=64, expert_file=ef)  # noqa: E731
    first = load(True).memory_plan.expert_file
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # the model file changed since
    m = load("auto")
    assert m.memory_plan.expert_file is None
    np.testing.assert_array_equal(m.logits(IDS[:6]), want)
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        second = load(True).memory_plan.expert_file
    assert second is not None and second != first
    assert not first.exists() and "changed since it was written" in caplog.text   # the stale one is gone
    caplog.clear()
    with open(second, "r+b") as f:   # damaged: cut short
        f.truncate(os.path.getsize(second) - 4096)
    assert load("auto").memory_plan.expert_file is None
    assert load(True).memory_plan.expert_file == second and os.path.getsize(second) % 4096 == 0
    second.unlink()
    fake_disk(monkeypatch, free=1024)
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        m = load(True)
    assert m.memory_plan.expert_file is None and "GiB free" in caplog.text
    assert not second.exists()
    np.testing.assert_array_equal(m.logits(IDS[:6]), want)


def _finished_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_prepared_files_are_found_and_removed(tmp_path, monkeypatch, caplog):
    """Writing a model's prepared file removes the leftovers of interrupted writes and the model's files
    that another st-sdk format wrote; a partial file still being written, and other models' current
    files, stay."""
    from st_sdk.offload import prepared

    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    a = write_model(tmp_path / "a", preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    b = write_model(tmp_path / "b", preset="tiny", formats=("gguf",), dtype="q8_0", seed=4)["gguf"]
    load = lambda path: st_sdk.load(path, backend="numpy", max_memory=budget_for(path, 12), context=64,  # noqa: E731
                                    expert_file=True)
    kept = load(b).memory_plan.expert_file
    directory = kept.parent
    old = directory / "a.0123456789abcdef0123.stx"   # format 1: no sources in its header
    body = json.dumps({"files": [os.path.realpath(a)], "layers": 1, "experts": 1, "signature": "x", "stride": 4096})
    old.write_bytes((prepared.MAGIC + len(body).to_bytes(4, "little") + body.encode()).ljust(prepared.HEADER, b"\0")
                    + bytes(4096))
    dead = directory / f"{kept.name}.{_finished_pid()}.partial"
    dead.write_bytes(bytes(8192))
    os.utime(dead, (0, 1))   # untouched for long
    live = directory / f"{kept.name}.{os.getpid()}.partial"
    live.write_bytes(bytes(100))
    states = {e.path.name: (e.state, e.why) for e in prepared.scan(directory)}
    assert states[kept.name] == ("current", "")
    assert states[old.name][0] == "stale" and "another version of st-sdk (format 1" in states[old.name][1]
    assert states[dead.name][0] == "stale" and "interrupted write" in states[dead.name][1]
    assert states[live.name][0] == "writing"

    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        written = load(a).memory_plan.expert_file
    assert written.exists() and kept.exists() and live.exists()
    assert not old.exists() and not dead.exists()
    assert f"removed 2 stale file(s) from {directory}" in caplog.text and old.name in caplog.text
    os.unlink(a)   # the model file is gone: its prepared file is stale
    assert prepared.examine(written).why == f"its model file {os.path.realpath(a)} is gone"
    damaged = directory / "c.0123456789abcdef0123.stx"   # this format, sources unreadable
    body = json.dumps({"sources": [["x"]], "layers": 1, "experts": 1, "signature": "x", "stride": 4096,
                       "version": prepared.VERSION})
    damaged.write_bytes((prepared.MAGIC + len(body).to_bytes(4, "little") + body.encode()).ljust(prepared.HEADER, b"\0"))
    assert (prepared.examine(damaged).state, prepared.examine(damaged).why) == ("stale", "a damaged header")


def test_model_files_too_many_for_the_header_fall_back_to_converting(tmp_path, monkeypatch, caplog):
    """Model files whose names do not fit a prepared file's header: no file, a warning, the experts
    converted as they are read, the resident logits."""
    from st_sdk.offload import prepared

    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    want = st_sdk.load(path, backend="numpy").logits(IDS[:6])
    budget = budget_for(path, 12)
    monkeypatch.setattr(prepared, "HEADER", 64)
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        m = st_sdk.load(path, backend="numpy", max_memory=budget, context=64, expert_file=True)
    assert m.memory_plan.expert_file is None and "64-byte header holds" in caplog.text
    assert not (tmp_path / "cache" / "experts").exists() or not any((tmp_path / "cache" / "experts").iterdir())
    np.testing.assert_array_equal(m.logits(IDS[:6]), want)


def test_cache_command_lists_and_cleans(tmp_path, monkeypatch, capsys):
    """`st-sdk cache` lists the prepared files with their model files and states; --clean removes the
    stale ones, --clean --all every one not being written; --all alone is refused."""
    from st_sdk.cli import main

    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    a = write_model(tmp_path / "a", preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    b = write_model(tmp_path / "b", preset="tiny", formats=("gguf",), dtype="q8_0", seed=4)["gguf"]
    files = [st_sdk.load(p, backend="numpy", max_memory=budget_for(p, 12), context=64,
                         expert_file=True).memory_plan.expert_file for p in (a, b)]
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a changed: its file is stale
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cache") in out and "1 stale" in out and f"from {os.path.realpath(b)}" in out
    assert main(["cache", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {e["path"]: e["state"] for e in doc["expert_files"]} == {str(files[0]): "stale", str(files[1]): "current"}
    assert main(["cache", "--clean"]) == 0
    assert "removed" in capsys.readouterr().out and not files[0].exists() and files[1].exists()
    assert main(["cache", "--all"]) == 1 and "--all goes with --clean" in capsys.readouterr().err
    assert main(["cache", "--clean", "--all"]) == 0
    assert not files[1].exists()


def test_info_plans_a_budget_without_loading(files, monkeypatch, capsys):
    """`st-sdk info MODEL --max-memory SIZE` gives the plan load makes at that budget, the smallest budget
    the model runs in and the one that caches every expert, without loading anything."""
    from st_sdk.cli import main
    from st_sdk.cli.info import describe
    from st_sdk.sizes import fmt_bytes

    monkeypatch.setattr(offload_experts, "headroom_bytes", HEADROOM)   # the minimum depends on it
    path = files["gguf-q8_0"]
    d = describe(path, "64GiB", context=64)["memory_plan"]
    load = lambda budget: st_sdk.load(path, backend="numpy", max_memory=budget, context=64,  # noqa: E731
                                      kv_dtype="f16").memory_plan   # as planned: the c, torch and jax default
    lo, hi = d["minimum_budget_bytes"], d["all_experts_budget_bytes"]
    assert load(lo).slots == load(lo).minimum_slots and load(hi).slots == d["experts"] == load(hi + 10**6).slots
    assert load(hi - 1).slots == d["experts"] - 1
    with pytest.raises(InputError, match="the minimum budget is") as too_small:
        load(lo - 1)
    assert f"the minimum budget is {fmt_bytes(lo)}" in str(too_small.value)   # the figure info prints
    middle = (lo + hi) // 2
    assert describe(path, middle, context=64)["memory_plan"]["slots"] == load(middle).slots
    assert main(["info", str(path), "--max-memory", str(middle), "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert f"expert cache {load(middle).slots} x" in out and "runs from" in out
    assert main(["info", str(path), "--context", "64"]) == 1
    assert "--context goes with --max-memory" in capsys.readouterr().err


def test_expert_file_argument_is_checked(files):
    with pytest.raises(InputError, match="expert_file"):
        st_sdk.load(files["gguf-q8_0"], backend="numpy", max_memory="64GiB", expert_file="yes")


def test_the_backends_own_step_activations_replace_the_plans_reserve(files):
    """The plan sets aside ACTIVATION_BYTES for a step's activations until the backend says what a step
    of one chunk takes (Backend.step_scratch_bytes; NumPy does not, so its plan keeps the reserve). The
    C backend's figure grows with the step's tokens, is far below the reserve for the tiny model, and
    what it frees goes to the expert cache; the logits stay the resident ones. A plan given its scratch
    whole keeps it."""
    from st_sdk.offload.budget import plan_memory

    path = files["gguf-q8_0"]
    budget = budget_for(path, 8)
    ref = st_sdk.load(path, backend="numpy", max_memory=budget, context=64)
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64)
    p, backend = m.memory_plan, m.backend
    assert ref.memory_plan.activation_bytes == offload_experts.ACTIVATION_BYTES and ref.memory_plan.slots == 8
    step = [backend.step_scratch_bytes(m.config, t, 64) for t in (1, 16, m.chunk_size)]
    assert p.activation_bytes == step[-1] and 0 < step[0] < step[1] < step[2] < offload_experts.ACTIVATION_BYTES // 8
    assert p.slots > ref.memory_plan.slots
    want = st_sdk.load(path, backend="c", n_threads=1).logits(IDS)
    np.testing.assert_allclose(m.logits(IDS), want, rtol=0, atol=2e-2 * np.abs(want).max())
    with pytest.raises(InputError, match="tokens=0"):
        backend.step_scratch_bytes(m.config, 0, 64)

    mib = 2**20
    reserved = plan_memory(200 * mib, 10 * mib, 10 * mib, mib, 1000, 2, 80 * mib, activation_bytes=64 * mib)
    given = plan_memory(200 * mib, 10 * mib, 10 * mib, mib, 1000, 2, 80 * mib)
    reserved.account(0, activations=16 * mib)
    given.account(0, activations=16 * mib)
    assert (reserved.slots, reserved.scratch_bytes) == (100 + 48, 32 * mib)
    assert (given.slots, given.scratch_bytes) == (100, 80 * mib)
    # a budget too small only for the reserve: the minimum of slots until the backend's figure refits it
    tight = plan_memory(110 * mib, 10 * mib, 10 * mib, mib, 1000, 2, 90 * mib, activation_bytes=64 * mib)
    assert tight.slots == 4
    tight.account(0, activations=mib)
    assert tight.slots == 63
    with pytest.raises(InputError, match="too small"):
        plan_memory(110 * mib, 10 * mib, 10 * mib, mib, 1000, 2, 90 * mib)
    with pytest.raises(InputError, match="leaving room for 0 experts"):
        plan_memory(110 * mib, 10 * mib, 10 * mib, mib, 1000, 2, 90 * mib, activation_bytes=64 * mib).account(
            0, activations=90 * mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_c_backend_counts_the_embedding_as_the_rows_it_reads(tmp_path):
    """Under a budget the C backend reads the embedding a row at a time off the file map (marked for
    random reads, so a row faults in its own pages only): the plan counts the pages a context of distinct
    rows touches instead of the whole table, and the expert cache gets the rest; the logits are the
    resident ones."""
    import mmap

    vocab, row = 3072, 64 // 32 * 34   # q8_0 rows of 64: two 34-byte blocks
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=5, vocab_size=vocab)["gguf"]
    # room for 4 experts with the whole table counted, and the C backend's step in place of the reserve
    step = st_sdk.load(path, backend="c", n_threads=1, max_memory="64GiB", context=8).memory_plan.activation_bytes
    budget = budget_for(path, 4, context=8, backend="numpy") - offload_experts.ACTIVATION_BYTES + step
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=8)
    p, table = m.memory_plan, m.offload.row_maps[0]
    assert table.nbytes == vocab * row and vocab * row - 2 * mmap.PAGESIZE < p.row_read_bytes <= vocab * row
    assert p.row_pages_bytes == 8 * 2 * mmap.PAGESIZE   # 8 tokens, each row within one page or across two
    counted = p.budget - p.resident_dense_bytes - p.kv_bytes - p.scratch_bytes - p.converted_bytes
    assert p.slots == counted // p.expert_bytes < p.n_experts
    whole = p.budget - p.dense_bytes - p.kv_bytes - p.scratch_bytes - p.converted_bytes   # the table counted whole
    assert p.slots >= whole // p.expert_bytes + (p.row_read_bytes - p.row_pages_bytes) // p.expert_bytes > 4 + 10
    assert "read a row at a time" in p.describe()
    assert "rr" in vm_flags(table.ctypes.data + mmap.PAGESIZE)
    want = st_sdk.load(path, backend="c", n_threads=1).logits(IDS[:8])
    np.testing.assert_allclose(m.logits(IDS[:8]), want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_run_time_check_drops_the_rows_read_before_giving_slots_back(files, monkeypatch):
    """A process found past its limit first drops the pages of the weights read by rows (they refault a
    row at a time); slots are given back only if that was not enough."""
    from st_sdk.weights import mapping

    path = files["gguf-q8_0"]
    monkeypatch.setattr(offload_experts, "runtime_limit", lambda budget: budget)
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 16, backend="c"), context=64)
    cache = m.offload
    assert len(cache.row_maps) == 1
    released = []
    monkeypatch.setattr(mapping, "release_map", lambda a: released.append(a) or a.nbytes)
    sizes = iter([cache.limit + 100, cache.limit - 1])          # over, then within once the rows are dropped
    assert cache.keep_within(rss=lambda: next(sizes)) == 0
    assert released == cache.row_maps and cache.slots == 16
    sizes = iter([cache.limit + 2 * cache._stride] * 2)         # still over: then slots go
    assert cache.keep_within(rss=lambda: next(sizes)) == 2 and cache.slots == 14


def test_c_backend_under_a_budget_holds_what_every_token_reads_in_anonymous_memory(files):
    """At a budget's hard limit the kernel makes room by reclaiming file pages: the weights every token
    reads (the f32 routers and norms, left in the file map when resident) are copied out of the map under
    a budget, their map pages dropped, so the budget counts them once; the embedding stays in the map."""
    from st_sdk.weights.mapping import in_file_map
    from st_sdk_backends.c.ops import as_mat

    path = files["gguf-q8_0"]
    resident = st_sdk.load(path, backend="c", n_threads=1)
    assert in_file_map(as_mat(resident.params.layers[0].router).data)   # resident: read from the map
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 8, backend="c"), context=64)
    every_token = [as_mat(lp.router).data for lp in m.params.layers] + [m.params.norm.value] + \
        [getattr(lp, f).value for lp in m.params.layers for f in ("attn_norm", "ffn_norm")]
    assert not any(in_file_map(a) for a in every_token)
    assert in_file_map(m.offload.row_maps[0])
    d = m.backend.describe()
    assert d["copied_weight_bytes"] > 0 and d["released_map_bytes"] > 0
    want = resident.logits(IDS)
    np.testing.assert_allclose(m.logits(IDS), want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_a_tied_head_copy_is_counted_when_the_table_is_read_by_rows(tmp_path):
    """A tied model on the C backend: the head runs its own repacked copy of the table and the table is
    read by rows. Under a budget the plan counts the copy in full and the table as its rows, never the
    table's dropped pages as freed as well (which would plan the copy's bytes away)."""
    vocab = 3072
    path = write_model(tmp_path, preset="tiny", formats=("gguf",), dtype="q8_0", seed=5, vocab_size=vocab,
                       tie_word_embeddings=True)["gguf"]
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 30, context=8, backend="numpy"),
                    context=8)
    p, d = m.memory_plan, m.backend.describe()
    assert m.params.head is not m.params.embed and p.row_read_bytes > 0
    assert d["repacked_weight_bytes"] >= vocab * 68                      # the head's copy...
    assert p.converted_bytes >= vocab * 68 - 2 * mmap.PAGESIZE             # ...is counted against the budget


def test_use_counts_kept_between_loads_warm_the_next_one(files, tmp_path, monkeypatch, caplog, capsys):
    """A budget-mode load keeps lfru's use counts for its file (as at exit); the next load starts from
    them, with the experts counted most read into its slots before the first token, and computes the
    same logits. "read" leaves the kept counts as they are; a damaged file is ignored, named."""
    path = files["gguf-q8_0"]
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "1")
    budget = budget_for(path, 6, backend="c")
    first = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64, expert_file=True)
    assert first.offload.warmed == 0   # nothing kept yet
    want = first.logits(IDS[:20])
    s = first.session()
    for t in IDS:
        s.feed([int(t)])
    first.offload.keep_counts()
    profile_file = first.offload.counts_file
    assert profile_file.parent == tmp_path / "cache" / "experts" and profile_file.name.startswith(path.name)
    with np.load(profile_file) as z:
        counts = z["counts"]
        st = os.stat(path)
        assert json.loads(str(z["sources"])) == [[os.path.realpath(path), st.st_size, st.st_mtime_ns]]
    cfg = first.config
    assert counts.shape == (cfg.num_hidden_layers, cfg.moe_num_primary_experts)
    np.testing.assert_array_equal(counts, first.offload.use_counts(cfg.moe_num_primary_experts))
    assert counts.sum() > 0

    second = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64, expert_file=True)
    cache = second.offload
    assert cache.warmed == 5 == len(cache.lru)   # every slot but one, before the first token
    top = sorted(((-counts[l, e], l, e) for l, e in zip(*np.nonzero(counts))))[:5]
    assert set(cache.lru) == {(int(l), int(e)) for _, l, e in top}
    assert cache.stats.reads == 0   # the statistics start after the warm reads
    np.testing.assert_array_equal(second.logits(IDS[:20]), want)

    from st_sdk.cli import main   # the CLI says so (--json: offload.warmed)
    assert main(["generate", str(path), "-p", "hello", "-n", "2", "--backend", "c", "--threads", "1",
                 "--temperature", "0", "--json", "--max-memory", str(budget), "--context", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["offload"]["warmed"] == 5

    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "read")
    before = profile_file.read_bytes()
    third = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64, expert_file=True)
    third.logits(IDS)
    assert third.offload.warmed == 5 and third.offload.keep_counts is None
    assert profile_file.read_bytes() == before

    profile_file.write_bytes(b"not an array")
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        fourth = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64, expert_file=True)
    assert fourth.offload.warmed == 0 and str(profile_file) in caplog.text
    np.testing.assert_array_equal(fourth.logits(IDS[:20]), want)

    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "yes")
    with pytest.raises(InputError, match="ST_OFFLOAD_PROFILE"):
        st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64, expert_file=True)


def test_damaged_counts_are_named_when_no_prepared_file_is_written(files, tmp_path, monkeypatch, caplog):
    """With the disk too full for the prepared expert file, a load still clears its model's stale files
    (damaged use counts among them) and says which, in which directory; nothing is warmed from them."""
    path = files["gguf-q8_0"]
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "1")
    fake_disk(monkeypatch, free=2 << 30, total=100 << 30)   # below the 10 GiB a 100 GiB disk keeps free
    budget = budget_for(path, 6, backend="c")
    first = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64)
    assert first.memory_plan.expert_file is None
    first.logits(IDS[:8])
    first.offload.keep_counts()
    counts = first.offload.counts_file
    counts.write_bytes(b"not an array")
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        second = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget, context=64)
    assert second.offload.warmed == 0 and not counts.exists()
    assert f"removed 1 stale file(s) from {counts.parent}" in caplog.text and counts.name in caplog.text


def test_warming_the_cache_shows_its_reads_on_a_progress_bar(files, monkeypatch):
    """The experts read into the slots at load (from kept counts) take seconds on a large model: a
    progress bar (on a terminal) counts their bytes, each expert's slot bytes once."""
    import st_sdk.weights.export as export

    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):   # the prepared expert file's bar, written at load
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

    monkeypatch.setattr(export, "progress_bar", Bar)
    path = files["gguf-q8_0"]
    m = st_sdk.load(path, backend="c", n_threads=1, max_memory=budget_for(path, 6, backend="c"), context=64)
    cache = m.offload
    keys = [(1, 0), (0, 2), (1, 0), (0, 1)]   # the repeat is read once
    assert cache.warm(keys) == 3 and set(cache.lru) == {(1, 0), (0, 2), (0, 1)}
    [bar] = [b for b in bars if "used most" in b.desc]
    assert bar.total == bar.n == sum(int(cache.offsets[layer][-1]) for layer, _ in [(1, 0), (0, 2), (0, 1)])
    assert "3 experts" in bar.desc and bar.closed


def test_use_counts_kept_for_a_hugging_face_directory(files, tmp_path, monkeypatch):
    """A sharded Hugging Face directory keeps its counts too, keyed on the safetensors files its experts
    are read from; the next load starts from them."""
    path = files["hf-f32-sharded"]
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "1")
    budget = budget_for(path, 6)
    first = st_sdk.load(path, backend="numpy", max_memory=budget, context=64)
    want = first.logits(IDS[:20])
    first.offload.keep_counts()
    kept = first.offload.counts_file
    assert kept.name.startswith(Path(path).name + ".") and kept.exists()
    with np.load(kept) as z:
        sources = [s[0] for s in json.loads(str(z["sources"]))]
    assert sources and all(Path(s).suffix == ".safetensors" and Path(s).parent == Path(path).resolve()
                           for s in sources)
    second = st_sdk.load(path, backend="numpy", max_memory=budget, context=64)
    assert second.offload.counts_file == kept and second.offload.warmed == 5
    np.testing.assert_array_equal(second.logits(IDS[:20]), want)


def test_kept_counts_are_listed_and_cleaned_with_the_prepared_files(tmp_path, monkeypatch, capsys, caplog):
    """`st-sdk cache` lists kept use counts with their model file; once that file changes they are
    stale, and --clean removes them, as it removes an earlier st-sdk's counts file (no model files
    recorded) and a dead process's half-written one. A load of the changed file removes its own stale
    counts."""
    from st_sdk.cli import main

    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "1")
    path = write_model(tmp_path / "m", preset="tiny", formats=("gguf",), dtype="q8_0", seed=3)["gguf"]
    budget = budget_for(path, 6)
    m = st_sdk.load(path, backend="numpy", max_memory=budget, context=64, expert_file=False)
    m.logits(IDS[:20])
    m.offload.keep_counts()
    kept = m.offload.counts_file
    directory = kept.parent
    legacy = directory / f"{path.name}.0123456789abcdef0123.uses.npy"
    np.save(legacy, np.ones((2, 2), np.float32))
    dead = directory / f"{kept.name}.{_finished_pid()}.tmp"
    dead.write_bytes(b"x")
    os.utime(dead, (0, 1))   # untouched for long
    assert main(["cache", "--json"]) == 0
    doc = {e["path"]: e for e in json.loads(capsys.readouterr().out)["expert_files"]}
    assert doc[str(kept)]["kind"] == "counts" and doc[str(kept)]["state"] == "current"
    assert doc[str(kept)]["sources"] == [os.path.realpath(path)]
    assert doc[str(legacy)]["state"] == "stale" and "earlier st-sdk" in doc[str(legacy)]["why"]
    assert doc[str(dead)]["state"] == "stale" and "interrupted write" in doc[str(dead)]["why"]

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # the model file changed
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"counts  stale    {kept.name}" in out and "changed since it was written" in out
    again = st_sdk.load(path, backend="numpy", max_memory=budget, context=64, expert_file=False)
    assert again.offload.warmed == 0 and again.offload.counts_file != kept
    assert not kept.exists()   # the load removed its model's stale counts; the others wait for --clean
    assert main(["cache", "--clean"]) == 0
    assert "removed" in capsys.readouterr().out and not legacy.exists() and not dead.exists()


def test_a_budget_lays_its_layers_out_by_the_live_shares_an_earlier_run_kept(tmp_path, monkeypatch):
    """Under a memory budget no prefill at load measures each layer's share of live neurons: a run
    counts them, each layer under its own index, and keeps them with the expert use counts; the next
    load lays each layer's up and down out by them (the C backend's sparse ReGLU layouts below the
    threshold), with the logits of the resident model, and keeps the mean of its own shares and those
    kept before, and the layouts it chose; a later load keeps a layer's layout while its share is near
    the threshold (each change writes a new prepared expert file)."""
    from st_sdk.offload import prepared
    from st_sdk.offload.profile import read_layouts, read_live
    from st_sdk.synth import write_model
    from st_sdk_backends.c import backend as cbackend
    from st_sdk_backends.c.layouts import HYSTERESIS

    probe = cbackend.CBackend()
    if not probe.is_available() or not probe._repacking():
        pytest.skip("the sparse layouts need a SIMD variant of the C backend")
    monkeypatch.delenv("ST_C_SPARSE_LAYOUT", raising=False)
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_OFFLOAD_PROFILE", "1")
    path = write_model(tmp_path, preset="tiny", layers=8, formats=("gguf",), dtype="q4_0", seed=0,
                       routing="trained")["gguf"]
    threshold = float(np.median(st_sdk.load(path, backend="c", n_threads=2).backend.load_live_shares))
    monkeypatch.setenv("ST_C_SPARSE_LIVE", repr(threshold))
    # the resident model laid out by the same threshold: a layer in the other layout sums its up rows in
    # another order, and on this tiny model one ReGLU output on a rounding boundary of its Q8 block then
    # moves the logits by up to 1% (the bounds of docs/c_backend.md, "Accuracy", allow 5%)
    resident = st_sdk.load(path, backend="c", n_threads=2)
    budget = budget_for(path, 12, backend="c", threads=2)

    first = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget, context=64)
    assert first.backend.layer_layouts is None   # nothing kept yet: repacked
    s = first.session()
    for t in IDS[:16]:
        s.feed([int(t)])
    seen = first.offload.live_seen()
    first.offload.keep_counts()   # as at exit
    kept = read_live(first.offload.counts_file, 8)
    assert kept == pytest.approx(seen) and all(v is not None and 0 < v < 1 for v in kept)
    assert len({round(v, 3) for v in kept}) > 4   # each layer its own share, not all under layer 0
    want = ["up+down" if v < threshold else "off" for v in kept]
    assert "up+down" in want and "off" in want

    # the kept file is read once at load for its shares, layouts and counts (the cleaning of the cache
    # directory before a prepared file is written examines every file there)
    opened, np_load, scan, scanning = [], np.load, prepared.scan, []
    monkeypatch.setattr(np, "load", lambda f, *a, **kw: (scanning or opened.append(str(f)), np_load(f, *a, **kw))[1])
    monkeypatch.setattr(prepared, "scan", lambda *a, **kw: (scanning.append(1), scan(*a, **kw), scanning.pop())[1])
    again = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget, context=64)
    monkeypatch.setattr(np, "load", np_load)
    assert [f for f in opened if f.endswith(".uses.npz")] == [str(again.offload.counts_file)]
    assert again.backend.layer_layouts == want
    for lp, layout in zip(again.params.layers, want):
        assert lp.down.raw.layout.name == ("neuron_major" if layout == "up+down" else "repacked")
    n = want.count("up+down")
    assert again.backend.describe()["sparse_layout"] == (f"auto: up+down in {n} of 8 layers (live < "
                                                          f"{threshold:.0%}), off in {8 - n} (by the live "
                                                          "shares kept from earlier runs)")
    s = again.session()   # a second run's shares are kept averaged with those kept before
    for t in IDS[16:32]:
        s.feed([int(t)])
    seen = again.offload.live_seen()
    again.offload.keep_counts()
    assert seen != pytest.approx(kept)
    shares = read_live(again.offload.counts_file, 8)
    assert shares == pytest.approx([(a + b) / 2 for a, b in zip(kept, seen)])
    assert read_layouts(again.offload.counts_file, 8, "c") == want   # the layouts chosen, kept with them
    assert read_layouts(again.offload.counts_file, 8, "torch") is None   # only for the backend that chose
    computes_as_resident(again, resident)

    # a layer keeps its layout while its share stays within HYSTERESIS past the threshold: with the
    # threshold just above the share of a layer laid out "off", it stays "off"
    shares = read_live(again.offload.counts_file, 8)   # as kept now (the run above may have kept more)
    i = want.index("off")
    moved = shares[i] + HYSTERESIS / 3
    monkeypatch.setenv("ST_C_SPARSE_LIVE", repr(moved))
    third = st_sdk.load(path, backend="c", n_threads=2, max_memory=budget, context=64)
    fresh = ["up+down" if v < moved else "off" for v in shares]
    assert fresh[i] == "up+down" and third.backend.layer_layouts[i] == "off"
    assert third.backend.layer_layouts == [
        ("up+down" if v < moved + HYSTERESIS else "off") if w == "up+down" else ("up+down" if v < moved - HYSTERESIS else "off")
        for v, w in zip(shares, want)]


def test_kept_live_shares_that_do_not_fit_the_model_are_ignored_with_a_warning(tmp_path, caplog):
    """The counts file's live shares: read back as written (None for a layer no step ran); shares out of
    [0, 1] or of another layer count are ignored with a warning naming the file; a file without any (an
    earlier st-sdk's) gives None quietly."""
    from st_sdk.offload.profile import read_layouts, read_live, write

    path, counts, sources = tmp_path / "m.uses.npz", np.ones((4, 8), np.float32), [["/m.gguf", 1, 2]]
    write(path, counts, sources, live=[0.25, None, 0.5, 0.125])
    assert read_live(path, 4) == [0.25, None, 0.5, 0.125]
    with caplog.at_level("WARNING", logger="st_sdk.offload"):
        assert read_live(path, 5) is None
        write(path, counts, sources, live=[0.25, None, 1.5, 0.125])
        assert read_live(path, 4) is None
    assert caplog.text.count(str(path)) == 2 and "live shares" in caplog.text
    caplog.clear()
    write(path, counts, sources)
    assert read_live(path, 4) is None and read_live(tmp_path / "missing.uses.npz", 4) is None
    assert caplog.text == ""
    # the layouts a backend chose from them: for that backend and that layer count only
    write(path, counts, sources, live=[0.25, None, 0.5, 0.125], layouts=("c", ["off", "off", "up+down", "off"]))
    assert read_layouts(path, 4, "c") == ["off", "off", "up+down", "off"] and read_live(path, 4)[0] == 0.25
    assert read_layouts(path, 4, "numpy") is None and read_layouts(path, 3, "c") is None
    write(path, counts, sources, live=[0.25, None, 0.5, 0.125])
    assert read_layouts(path, 4, "c") is None and read_layouts(tmp_path / "missing.uses.npz", 4, "c") is None
