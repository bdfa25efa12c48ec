"""The engine (continuous batching): lists of prompts and concurrent threads give what each request
gives alone; bounds on the batch, the queue and the KV cache; cancellation; feed_batch.

Token-for-token equality with running alone is checked on the C backend, whose batched step equals
the one-sequence step bit for bit; the NumPy reference's BLAS rounds differently by row count, so its
batched rows are checked to float32 rounding."""
import threading
import time

import numpy as np
import pytest

from generation_helpers import c_available, text_ids, tiny_model
from st_sdk.errors import BusyError, InputError

SAMPLED = dict(temperature=1.2, top_k=0, top_p=0.95, ignore_eos=True)
PROMPTS = ["The cat", "A much longer prompt that needs several chunks", "x", "Hello there, how are"]


EXACT = "c" if c_available() else None


@pytest.fixture(scope="module")
def model():
    if EXACT is None:
        pytest.skip("the C backend is not built here")
    m = tiny_model(seed=0, backend=EXACT)
    m.chunk_size = 8          # several prefill chunks per prompt, so prefill and decode share steps
    m.engine.configure(chunk=8)
    return m


def alone(model, prompt, **kw):
    """One request with the engine to itself."""
    return model.generate(prompt, **kw)


def test_a_list_of_prompts_equals_each_alone(model):
    kw = dict(max_new_tokens=9, seed=11, **SAMPLED)
    want = [alone(model, p, **kw) for p in PROMPTS]
    got = model.generate(PROMPTS, **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    assert all(r.finish_reason == "length" for r in got)


def test_lists_of_ids_and_streams(model):
    ids = [text_ids(p) for p in PROMPTS[:2]]
    kw = dict(max_new_tokens=5, temperature=0, ignore_eos=True)
    res = model.generate(ids, **kw)
    streams = model.generate(ids, stream=True, **kw)
    assert ["".join(s) for s in streams] == [r.text for r in res]
    assert [s.result.token_ids for s in streams] == [r.token_ids for r in res]
    # one prompt given as a list of ids is still one prompt
    assert model.generate(ids[0], **kw).token_ids == res[0].token_ids


def test_concurrent_threads_equal_serial_runs_and_share_steps(model):
    kw = [dict(max_new_tokens=12, seed=s, **SAMPLED) for s in range(len(PROMPTS))]
    want = [alone(model, p, **k).token_ids for p, k in zip(PROMPTS, kw)]
    steps0, rows0 = model.engine.stats.steps, model.engine.stats.step_rows
    got = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def work(i):
        barrier.wait()
        got[i] = model.generate(PROMPTS[i], **kw[i]).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    st = model.engine.stats
    assert (st.step_rows - rows0) > (st.steps - steps0)   # some steps carried several sequences


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_feed_batch_rows_equal_each_session_alone(backend):
    if backend == "c" and EXACT is None:
        pytest.skip("the C backend is not built here")
    model = tiny_model(seed=0, backend=backend)
    same = np.testing.assert_array_equal if backend == "c" else \
        (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    prompts = [text_ids("abc"), text_ids("hello w"), text_ids("z")]
    solo = [model.session() for _ in prompts]
    want = [s.feed(p) for s, p in zip(solo, prompts)]
    together = [model.session() for _ in prompts]
    got = model.feed_batch(together, prompts)
    for g, w in zip(got, want):
        same(g, w)
    # ragged: one session decodes one token while another takes a prompt chunk; the third sits out
    nxt = model.feed_batch(together[:2], [[5], text_ids("more")])
    same(nxt[0], solo[0].feed([5]))
    same(nxt[1], solo[1].feed(text_ids("more")))
    assert together[1].tokens == solo[1].tokens
    same(model.feed_batch([together[2]], [[7]])[0], solo[2].feed([7]))


def test_feed_batch_rejects_bad_input(model):
    s = model.session()
    with pytest.raises(InputError, match="as many id lists"):
        model.feed_batch([s], [[1], [2]])
    with pytest.raises(InputError, match="twice"):
        model.feed_batch([s, s], [[1], [2]])
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.feed_batch([s], [[10**6]])
    with pytest.raises(InputError, match="chunk size"):
        model.feed_batch([s], [list(range(model.chunk_size + 1))])
    other = tiny_model(seed=0)
    with pytest.raises(InputError, match="this model"):
        model.feed_batch([other.session()], [[1]])


def test_max_batch_bounds_the_running_set(model):
    m = tiny_model(seed=0, backend=EXACT)
    m.engine.configure(max_batch=2)
    kw = dict(max_new_tokens=4, temperature=0, ignore_eos=True)
    want = [m.generate(p, **kw).token_ids for p in PROMPTS]
    seen = []
    feed = m.feed_batch
    m.feed_batch = lambda sessions, ids: (seen.append(len(sessions)), feed(sessions, ids))[1]
    got = m.generate(PROMPTS, **kw)
    assert [r.token_ids for r in got] == want
    assert max(seen) == 2


def test_a_full_queue_refuses_and_a_waiting_request_can_be_cancelled():
    m = tiny_model(seed=0)
    gate = threading.Event()
    feed = m.feed_batch

    def slow(sessions, ids):
        gate.wait(10)
        return feed(sessions, ids)

    m.feed_batch = slow
    m.engine.configure(max_batch=1, max_queue=1)
    kw = dict(max_new_tokens=3, temperature=0, ignore_eos=True)
    running = m.generate("a", stream=True, **kw)
    deadline = time.time() + 5
    while m.engine.running == 0 and time.time() < deadline:
        time.sleep(0.01)
    waiting = m.generate("b", stream=True, **kw)
    with pytest.raises(BusyError, match="queue is full"):
        m.generate("c", **kw)
    assert m.engine.stats.rejected == 1 and m.engine.queue_depth == 1
    waiting.cancel()
    gate.set()
    assert list(waiting) == [] and waiting.result.finish_reason == "cancelled"
    assert isinstance(next(running), str)
    running.close()
    assert running.result.finish_reason in ("cancelled", "length")


def test_kv_bound_queues_and_rejects_what_can_never_fit():
    m = tiny_model(seed=0)
    one = m.config.kv_cache_bytes(len(text_ids("abc")) + 4)
    m.engine.configure(max_kv_bytes=one)
    kw = dict(max_new_tokens=4, temperature=0, ignore_eos=True)
    seen = []
    feed = m.feed_batch
    m.feed_batch = lambda sessions, ids: (seen.append(len(sessions)), feed(sessions, ids))[1]
    res = m.generate(["abc", "def", "ghi"], **kw)
    assert all(len(r.token_ids) == 4 for r in res) and max(seen) == 1   # one fits at a time
    with pytest.raises(InputError, match="KV cache"):
        m.generate("abc", max_new_tokens=50)


def test_cancel_mid_stream_frees_the_slot(model):
    kw = dict(max_new_tokens=200, temperature=0, ignore_eos=True)
    it = model.generate("abc", stream=True, **kw)
    next(it)
    it.cancel()
    rest = list(it)
    assert it.result.finish_reason == "cancelled" and len(it.result.token_ids) < 200
    assert len(rest) < 200
    deadline = time.time() + 5
    while model.engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert model.engine.running == 0


def test_a_failing_step_fails_its_requests_not_the_engine():
    m = tiny_model(seed=0)
    feed = m.feed_batch
    calls = []

    def flaky(sessions, ids):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return feed(sessions, ids)

    m.feed_batch = flaky
    with pytest.raises(RuntimeError, match="boom"):
        m.generate("abc", max_new_tokens=5, temperature=0)
    assert m.generate("abc", max_new_tokens=2, temperature=0, ignore_eos=True).finish_reason == "length"


def test_engine_settings_are_checked(model):
    with pytest.raises(InputError, match="max_batch"):
        model.engine.configure(max_batch=0)
    with pytest.raises(InputError, match="unknown"):
        model.engine.configure(batch=3)


def test_the_engine_thread_ends_when_idle():
    m = tiny_model(seed=0)
    m.engine.configure(idle_s=0.05)
    m.generate("abc", max_new_tokens=2)
    deadline = time.time() + 5
    while m.engine._thread is not None and time.time() < deadline:
        time.sleep(0.01)
    assert m.engine._thread is None
    assert not any(t.name == "st-sdk-engine" and t.is_alive() for t in threading.enumerate()
                   if getattr(t, "_target", None) and getattr(t._target, "__self__", None) is m.engine)
