"""Prompt caching (the longest shared prefix of consecutive requests is not read again) and
conversations saved to a file and loaded in another process."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import st_sdk
from st_sdk.errors import InputError
from st_sdk.generation import Conversation

BACKENDS = ["numpy", "c", "torch"]


def available(name):
    from st_sdk.registry import get_registry

    cls = get_registry().backends().get(name)
    if cls is None or not cls().is_available():
        pytest.skip(f"backend {name} is not available here")


def global_model(backend="numpy", seed=0):
    """The tiny shape with every layer global (as the 4b-a0.6b): caches can always be rewound."""
    from st_sdk.synth import build_model, preset_config

    cfg = preset_config("tiny", sliding_window_layout=[0, 0, 0, 0])
    return build_model(cfg, seed=seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewound_session_gives_the_logits_of_a_fresh_one(backend):
    available(backend)
    m = global_model(backend)
    a = list(range(3, 40))
    s = m.session()
    s.feed(a)
    assert s.rewind(20) and s.tokens == a[:20]
    b = a[:20] + [7, 8, 9, 400]
    got = s.feed(b[20:], all_logits=True)
    want = m.logits(b)[20:]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_wrapped_sliding_window_ring_is_not_rewound():
    from st_sdk.synth import build_model

    m = build_model("tiny", seed=0)          # window 8 on three layers of four
    s = m.session()
    s.feed(list(range(3, 30)))
    assert not s.rewind(10) and len(s.tokens) == 27     # nothing changed
    s2 = m.session()
    s2.feed(list(range(3, 9)))                # 6 tokens: no ring wrapped yet
    assert s2.rewind(3) and s2.tokens == [3, 4, 5]


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_consecutive_requests_reuse_the_shared_prefix(backend):
    available(backend)
    m = global_model(backend)
    prefix = list(range(5, 105))
    kw = dict(max_new_tokens=6, seed=1, temperature=0.8, ignore_eos=True)
    first = m.generate(prefix + [11, 12], **kw)
    assert first.timings["cached_tokens"] == 0
    second = m.generate(prefix + [21, 22, 23], **kw)
    assert second.timings["cached_tokens"] == 100
    m.prompt_cache.clear()
    fresh = m.generate(prefix + [21, 22, 23], **kw)
    assert fresh.timings["cached_tokens"] == 0
    assert second.token_ids == fresh.token_ids and second.logprobs == fresh.logprobs
    # the same prompt again: everything but its last token is reused
    again = m.generate(prefix + [21, 22, 23], **kw)
    assert again.timings["cached_tokens"] == 102 and again.token_ids == fresh.token_ids


@pytest.mark.parametrize("backend", BACKENDS + ["jax"])
def test_requests_sharing_only_a_prefix_copy_it_and_leave_the_idle_session(backend):
    """A burst of requests with one system prompt: each gets the prefix's KV copied from the one idle
    session (which stays for the next), with the tokens of a fresh session."""
    available(backend)
    m = global_model(backend)
    system = list(range(5, 65))
    kw = dict(max_new_tokens=5, seed=3, temperature=0.9, ignore_eos=True, logprobs=True)
    m.generate(system + [9, 9], **kw)
    got = [m.generate(system + [20 + i, 30 + i], **kw) for i in range(3)]
    assert [r.timings["cached_tokens"] for r in got] == [60, 60, 60]
    assert len(m.prompt_cache.tokens) == 1
    for i, r in enumerate(got):
        m.prompt_cache.clear()
        fresh = m.generate(system + [20 + i, 30 + i], **kw)
        assert fresh.timings["cached_tokens"] == 0 and r.token_ids == fresh.token_ids
        np.testing.assert_allclose(r.logprobs, fresh.logprobs, atol=1e-5)
    # a prompt that continues the idle session's tokens takes the session itself (no copy)
    m.prompt_cache.clear()
    m.generate(system, **kw)
    held = m.prompt_cache._idle[0]
    m.generate(list(held.tokens) + [44], **kw)
    assert m.prompt_cache._idle[0] is held


def test_concurrent_requests_with_one_system_prompt_read_it_once():
    import threading

    m = global_model("c")
    system = list(range(5, 85))
    kw = dict(max_new_tokens=4, seed=1, temperature=0.7, ignore_eos=True)
    m.generate(system + [3], **kw)
    out = [None] * 6

    def run(i):
        out[i] = m.generate(system + [100 + i, 7], **kw)

    ths = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert [r.timings["cached_tokens"] for r in out] == [80] * 6
    for i, r in enumerate(out):
        m.prompt_cache.clear()
        assert m.generate(system + [100 + i, 7], **kw).token_ids == r.token_ids


def test_a_prefix_a_wrapped_ring_dropped_is_not_copied():
    from st_sdk.synth import build_model

    m = build_model("tiny", seed=0)          # window 8 on three layers of four
    src = m.session()
    src.feed(list(range(3, 30)))
    assert m.prompt_cache.fork(src, 20) is None
    short = m.session()
    short.feed(list(range(3, 9)))             # 6 tokens: no ring wrapped
    fork = m.prompt_cache.fork(short, 4)
    assert fork is not None and fork.tokens == [3, 4, 5, 6]
    want = m.session()
    want.feed([3, 4, 5, 6])
    np.testing.assert_allclose(fork.feed([11, 12]), want.feed([11, 12]), rtol=1e-5, atol=1e-5)


def test_prompt_cache_can_be_turned_off():
    m = global_model()
    m.prompt_cache.slots = 0
    m.generate([5, 6, 7, 8], max_new_tokens=2)
    assert m.generate([5, 6, 7, 9], max_new_tokens=2).timings["cached_tokens"] == 0
    assert m.prompt_cache.tokens == []


def test_conversation_rewinds_when_the_history_diverges():
    from generation_helpers import byte_tokenizer

    m = global_model()
    m.tokenizer = byte_tokenizer(512)
    # a stop string cuts the answer: the cache holds "xye", the history only "xy"
    conv = m.conversation(max_new_tokens=4, seed=0, stop="e", temperature=0,
                          logits_processors=[script_bytes(b"xye")])
    conv.send("Hi")
    held = list(conv.session.tokens)
    assert conv.messages[-1]["content"] == "xy" and held[-2:] == [ord("x"), ord("y")]
    conv.send("Hello again")
    assert 0 < conv.last_reused < len(held) + 1


def script_bytes(data: bytes):
    """A logits processor forcing the bytes of `data` in turn (then anything)."""
    def proc(ids, logits):
        out = logits.copy()
        n = proc.i
        proc.i += 1
        if n < len(data):
            out[:] = -np.inf
            out[data[n]] = 0.0
        return out
    proc.i = 0
    return proc


# ---- saved conversations ---------------------------------------------------------------------------------
def test_saved_conversation_continues_in_a_new_process(tmp_path):
    from st_sdk.synth import write_model

    # every layer global, so that the loaded cache is reused even where the history re-encodes differently
    path_model = write_model(tmp_path / "m", "tiny", formats="hf", sliding_window_layout=[0, 0, 0, 0])["hf"]
    model = st_sdk.load(path_model, backend="numpy")
    conv = model.conversation(system="Be brief.", max_new_tokens=8, seed=3)
    conv.send("Hello there")
    conv.send("Tell me more")
    path = tmp_path / "chat.safetensors"
    conv.save(path)
    want = conv.send("And then?")

    script = textwrap.dedent(f"""
        import json, st_sdk
        from st_sdk.generation import Conversation
        model = st_sdk.load({str(path_model)!r}, backend="numpy")
        conv = Conversation.load(model, {str(path)!r})
        res = conv.send("And then?")
        print(json.dumps(dict(ids=res.token_ids, reused=conv.last_reused, n=len(conv.messages))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ids"] == want.token_ids
    assert got["reused"] == want.timings["cached_tokens"] > 0 and got["n"] == len(conv.messages)


def test_saved_file_format(tiny_dir, tmp_path):
    from safetensors import safe_open

    model = st_sdk.load(tiny_dir["gguf"], backend="numpy")
    conv = model.conversation(max_new_tokens=4, seed=0)
    conv.send("Hi")
    conv.save(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="numpy") as f:
        meta, keys = f.metadata(), set(f.keys())
        tokens = json.loads(meta["tokens"])
        cfg = model.config
        assert meta["format"] == "st-sdk-conversation/1" and tokens == conv.session.tokens
        assert keys == {f"layers.{i}.{x}" for i in range(cfg.num_hidden_layers) for x in ("k", "v", "pos")}
        for i in range(cfg.num_hidden_layers):
            pos = f.get_tensor(f"layers.{i}.pos")
            w = cfg.layer_window(i)
            assert list(pos) == list(range(max(0, len(tokens) - w) if w else 0, len(tokens)))
            assert f.get_tensor(f"layers.{i}.k").shape == (len(pos), cfg.num_key_value_heads, cfg.head_dim)


def test_a_file_from_another_model_is_refused(tiny_dir, tmp_path):
    from st_sdk.synth import build_model

    model = st_sdk.load(tiny_dir["gguf"], backend="numpy")
    conv = model.conversation(max_new_tokens=4, seed=0)
    conv.send("Hi")
    conv.save(tmp_path / "c.safetensors")
    other = build_model("tiny", seed=7)
    other.tokenizer = model.tokenizer
    with pytest.raises(InputError, match="saved from another model"):
        Conversation.load(other, tmp_path / "c.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match="not a saved conversation"):
        Conversation.load(model, tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="no such"):
        Conversation.load(model, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("backend,kv_dtype", [(b, None) for b in BACKENDS] + [("c", "q8_0"), ("numpy", "q8_0")])
def test_cache_state_restores_into_a_new_session(backend, kv_dtype):
    """What a saved conversation relies on, on each backend's cache (sliding-window rings included),
    in its default storage type and in q8_0 (values read back and stored again round to themselves)."""
    from st_sdk.synth import build_model, preset_config

    available(backend)
    cfg = preset_config("tiny", head_dim=32) if kv_dtype == "q8_0" else "tiny"   # q8_0: blocks of 32 along head_dim
    m = build_model(cfg, seed=0, backend=backend, kv_dtype=kv_dtype)   # three of four layers are 8-token rings
    s = m.session()
    s.feed(list(range(3, 30)))
    state = s.cache.state()
    assert [len(pos) for _, _, pos in state] == [27 if m.config.layer_window(i) is None else 8 for i in range(4)]
    fresh = m.session()
    fresh.cache.restore(state, len(s.tokens))
    fresh.tokens = list(s.tokens)
    np.testing.assert_array_equal(fresh.feed([5, 6], all_logits=True), s.feed([5, 6], all_logits=True))
