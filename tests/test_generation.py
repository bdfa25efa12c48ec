"""Model.generate / chat / conversation: what comes out, when it stops, streaming, cancellation, threads."""
import asyncio
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from generation_helpers import (ENDOFTEXT, IM_END, byte_tokenizer, printable_only, script, text_ids,
                                tiny_model)
from st_sdk.errors import InputError
from st_sdk.generation import GenerationResult, IncrementalDecoder, StopStrings
from st_sdk.sampling import log_softmax

GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def scripted(text_or_ids, prompt="Hi"):
    """A fresh tiny model that answers `prompt` with the given bytes/ids."""
    m = tiny_model(seed=1)
    ids = text_ids(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    calls = script(m, len(text_ids(prompt)), ids)
    return m, calls


# ---- what comes out -------------------------------------------------------------------------------
def test_greedy_equals_argmax_of_full_forward(model):
    prompt = text_ids("The cat")
    res = model.generate(prompt, max_new_tokens=6, **GREEDY, ignore_eos=True)
    assert isinstance(res, GenerationResult) and isinstance(res, str)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(model.logits(seq)[-1])))
    assert res.token_ids == seq[len(prompt):]
    assert res.prompt_ids == prompt and res.finish_reason == "length"
    assert res.text == model.tokenizer.decode(res.token_ids)
    assert res.timings["prompt_tokens"] == len(prompt) and res.timings["generated_tokens"] == 6
    assert res.prefill_tps > 0 and res.decode_tps > 0


def test_text_prompt_is_encoded_with_the_tokenizer(model):
    a = model.generate("The cat", max_new_tokens=4, **GREEDY, ignore_eos=True)
    b = model.generate(text_ids("The cat"), max_new_tokens=4, **GREEDY, ignore_eos=True)
    assert a.prompt_ids == text_ids("The cat") and a.token_ids == b.token_ids


def test_seed_reproduces_and_different_seeds_differ(model):
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=0, top_p=1.0, ignore_eos=True)
    a, b = model.generate("x", seed=3, **kw), model.generate("x", seed=3, **kw)
    c = model.generate("x", seed=4, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_stream_pieces_join_to_the_result(model):
    kw = dict(max_new_tokens=10, seed=5, ignore_eos=True)
    res = model.generate("abc", **kw)
    it = model.generate("abc", stream=True, **kw)
    assert it.result is None
    pieces = list(it)
    assert "".join(pieces) == res.text and all(pieces)
    assert it.result.token_ids == res.token_ids and it.result.finish_reason == "length"


def test_logprobs_are_the_models_log_softmax(model):
    prompt = text_ids("ab")
    res = model.generate(prompt, max_new_tokens=4, seed=0, temperature=1.0, logprobs=3, ignore_eos=True)
    full = model.logits(prompt + res.token_ids[:-1])
    for j, tok in enumerate(res.token_ids):
        lp = log_softmax(full[len(prompt) - 1 + j])
        assert res.logprobs[j] == pytest.approx(lp[tok], abs=1e-4)
        assert list(res.top_logprobs[j]) == np.argsort(-lp)[:3].tolist()
    assert model.generate(prompt, max_new_tokens=2).logprobs is None


# ---- UTF-8 streaming ---------------------------------------------------------------------------
def test_incremental_decoder_never_splits_a_character():
    tok = byte_tokenizer()
    text = "a日本🎉é!"
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(b) for b in text.encode()]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["a", "日", "本", "🎉", "é", "!"]
    for _ in range(50):                  # special tokens write nothing and must not grow the window
        assert dec.push(300) == ""
    assert len(dec.ids) - dec.prefix <= 2
    assert [dec.push(b) for b in "日".encode()] == ["", "", "日"]


def test_stream_holds_multibyte_characters_until_complete():
    answer = "日本語🎉ok"
    m, _ = scripted(answer + "\x00", prompt="Hi")
    it = m.generate("Hi", stream=True, max_new_tokens=len(answer.encode()), **GREEDY)
    pieces = list(it)
    assert "".join(pieces) == answer and it.result == answer
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:4] == ["日", "本", "語", "🎉"]


# ---- stopping ---------------------------------------------------------------------------------------
def test_eos_ids_stop_and_are_not_in_the_text():
    for eos in (IM_END, ENDOFTEXT):   # both end-of-sequence ids count
        m, _ = scripted(text_ids("hey") + [eos] + text_ids("more"))
        res = m.generate("Hi", max_new_tokens=20, **GREEDY)
        assert res == "hey" and res.finish_reason == "eos" and res.token_ids[-1] == eos
    res = m.generate("Hi", max_new_tokens=6, ignore_eos=True, **GREEDY)
    assert res == "heymo" and res.finish_reason == "length" and len(res.token_ids) == 6
    m = tiny_model(seed=1, eos_token_id=(ord("y"),))   # the config's eos ids count too
    script(m, 2, text_ids("hey"))
    assert m.generate("Hi", max_new_tokens=5, **GREEDY) == "he"


def test_stop_string_across_token_boundaries():
    m, _ = scripted("hello wor<END>ld after")
    res = m.generate("Hi", stop=["<END>", "zzz"], max_new_tokens=40, **GREEDY)
    assert res == "hello wor" and res.finish_reason == "stop"
    it = m.generate("Hi", stop="<END>", stream=True, max_new_tokens=40, **GREEDY)
    pieces = list(it)
    assert "".join(pieces) == "hello wor"
    assert not any("<" in p for p in pieces)   # nothing of the stop string is ever emitted


def test_stop_string_prefix_that_does_not_complete_is_emitted():
    m, _ = scripted("a <EN b <END")
    it = m.generate("Hi", stop="<END>", stream=True, max_new_tokens=9, **GREEDY)
    pieces = list(it)
    assert "".join(pieces) == "a <EN b <" and it.result.finish_reason == "length"
    assert m.generate("Hi", stop="<END>", max_new_tokens=40, **GREEDY).finish_reason == "length"


def test_earliest_stop_string_wins():
    m, _ = scripted("one two three")
    assert m.generate("Hi", stop=["three", "two"], max_new_tokens=30, **GREEDY) == "one "


def test_max_new_tokens_and_context_length():
    m = tiny_model(seed=2, max_position_embeddings=24)
    with pytest.raises(InputError, match=r"10 tokens \+ max_new_tokens=100 = 110 tokens exceed .* context of 24"):
        m.generate(text_ids("0123456789"), max_new_tokens=100, ignore_eos=True, seed=0)
    res = m.generate(text_ids("0123456789"), max_new_tokens=None, ignore_eos=True, seed=0)
    assert res.finish_reason == "length" and 10 + len(res.token_ids) == 24
    with pytest.raises(InputError, match="context"):
        m.generate(list(range(25)))
    with pytest.raises(InputError, match="prompt"):
        m.generate(list(range(24)))
    res = m.generate("01", max_new_tokens=3, ignore_eos=True, seed=0)
    assert len(res.token_ids) == 3 and res.finish_reason == "length"


@pytest.mark.parametrize("prompt, match", [("", "prompt"), ([], "prompt"), ([1, 9999], "outside the vocabulary"),
                                           ([-1], "outside the vocabulary"), (3.5, "prompt")])
def test_bad_prompts_are_refused(model, prompt, match):
    with pytest.raises(InputError, match=match):
        model.generate(prompt)


@pytest.mark.parametrize("kw, name", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=[""]), "stop"),
                                      (dict(stop=[3]), "stop"), (dict(stop=3), "stop"), (dict(seed=-2), "seed"),
                                      (dict(logprobs=-1), "logprobs")])
def test_bad_options_are_refused_before_any_work(model, kw, name):
    with pytest.raises(InputError, match=name):
        model.generate("hi", stream=True, **kw)


# ---- cancellation -------------------------------------------------------------------------------
def test_closing_the_stream_cancels(model):
    it = model.generate("abc", stream=True, max_new_tokens=50, ignore_eos=True, seed=0)
    n = 0
    for _ in it:
        n += 1
        if n == 2:
            break
    it.close()
    assert it.result.finish_reason == "cancelled" and len(it.result.token_ids) < 50
    with model.generate("abc", stream=True, max_new_tokens=50, ignore_eos=True, seed=0) as it2:
        next(it2)
    assert it2.result.finish_reason == "cancelled"
    it3 = model.generate("abc", stream=True)
    it3.close()                  # before anything ran
    assert it3.result.finish_reason == "cancelled" and it3.result == "" and list(it3) == []


def test_cancel_during_a_long_prefill():
    m = tiny_model(seed=3)
    m.chunk_size = 4
    calls = script(m, 0, [])     # counts forward calls; the logits do not matter here
    cancel = threading.Event()
    real = m._forward

    def forward(*a, **k):
        if len(calls) == 2:
            cancel.set()         # as if another thread asked to stop while the prompt is being read
        return real(*a, **k)

    m._forward = forward
    res = m.generate(list(range(40)), max_new_tokens=5, cancel=cancel)
    assert res.finish_reason == "cancelled" and res.token_ids == []
    assert len(calls) == 3       # 3 of the 10 prompt chunks ran

    it = tiny_model(seed=3).generate(list(range(40)), stream=True, max_new_tokens=5)
    it.cancel()                  # from any thread, before or while the prefill runs
    assert list(it) == [] and it.result.finish_reason == "cancelled"


# ---- threads and async --------------------------------------------------------------------------
def test_one_model_shared_by_threads_matches_serial(model):
    jobs = [("alpha", 1), ("beta", 2), ("gamma", 3), ("delta", 4)]
    kw = dict(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    serial = [model.generate(p, seed=s, **kw).token_ids for p, s in jobs]
    out = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        out[i] = model.generate(jobs[i][0], seed=jobs[i][1], **kw).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == serial


def test_no_memory_growth_per_request(model):
    import gc
    import tracemalloc

    def requests(n):
        for _ in range(n):
            model.generate("hello", max_new_tokens=8, seed=0, ignore_eos=True)
            list(model.generate("hello", max_new_tokens=8, seed=0, ignore_eos=True, stream=True))

    requests(3)
    tracemalloc.start()
    try:
        requests(3)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        requests(12)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # a leaked session (KV cache, logits) would be several KiB per request: 24 requests >> 32 KiB
    assert grown < 32 * 1024


def test_agenerate_yields_the_same_pieces(model):
    kw = dict(max_new_tokens=8, seed=9, ignore_eos=True)
    expected = list(model.generate("abc", stream=True, **kw))

    async def collect():
        return [p async for p in model.agenerate("abc", **kw)]

    assert asyncio.run(collect()) == expected

    async def first_then_leave():
        agen = model.agenerate("abc", **dict(kw, max_new_tokens=None))
        piece = await agen.__anext__()
        await agen.aclose()          # what leaving an `async for` early does
        return piece

    assert asyncio.run(asyncio.wait_for(first_then_leave(), 60)) == expected[0]


# ---- chat and conversations --------------------------------------------------------------------
def test_chat_applies_the_template(model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    res = model.chat(msgs, max_new_tokens=3, **GREEDY, ignore_eos=True)
    want = model.tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert res.prompt_ids == want
    assert res.token_ids == model.generate(want, max_new_tokens=3, **GREEDY, ignore_eos=True).token_ids
    assert "".join(model.chat(msgs, stream=True, max_new_tokens=3, **GREEDY, ignore_eos=True)) == res


@pytest.mark.parametrize("msgs, match", [([], "messages"), ("hi", "messages"), ([{"role": "user"}], r"messages\[0\]"),
                                         ([{"role": "user", "content": 3}], "content")])
def test_chat_validates_messages(model, msgs, match):
    with pytest.raises(InputError, match=match):
        model.chat(msgs)


def test_conversation_reuses_the_cache_and_matches_a_fresh_chat():
    m = tiny_model(seed=4)
    printable_only(m)
    kw = dict(max_new_tokens=6, temperature=0.8, seed=11)
    conv = m.conversation(system="You are terse.")
    first = conv.send("Hello", **kw)
    second = conv.send("And then?", **kw)
    assert conv.last_reused > len(first.prompt_ids)     # the first turn's prompt and answer were cached
    fresh = m.chat([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}], **kw)
    assert second.prompt_ids == fresh.prompt_ids and second.token_ids == fresh.token_ids
    assert second.timings["cached_tokens"] == conv.last_reused
    pieces = list(conv.send("Streamed", stream=True, **kw))
    assert conv.messages[-1] == {"role": "assistant", "content": "".join(pieces)} and conv.last_reused > 0
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "You are terse."}]
    assert conv.send("Hello", **kw).token_ids == first.token_ids and conv.last_reused == 0


def test_conversation_after_a_failed_or_cancelled_turn():
    m = tiny_model(seed=5)
    conv = m.conversation(max_new_tokens=4, ignore_eos=True, temperature=0)
    conv.send("one")
    history = list(conv.messages)
    it = conv.send("two", stream=True)
    it.close()                                     # a cancelled turn does not join the history
    assert conv.messages == history
    real = m._forward

    def broken(*a, **k):
        raise RuntimeError("backend failure")

    m._forward = broken
    with pytest.raises(RuntimeError):
        conv.send("three")
    m._forward = real
    assert conv.messages == history
    res = conv.send("three")                       # a failed step may have left half a token in the cache
    assert conv.last_reused == 0 and res.finish_reason == "length"
    assert res.token_ids == m.chat(history + [{"role": "user", "content": "three"}], max_new_tokens=4,
                                   ignore_eos=True, temperature=0).token_ids


def test_streaming_result_class_and_repr(model):
    res = model.generate("a", max_new_tokens=2, ignore_eos=True)
    assert "finish_reason='length'" in repr(res)
    d = res.to_dict()
    assert d["text"] == res and d["token_ids"] == res.token_ids and d["finish_reason"] == "length"


def test_stop_strings_unit():
    s = StopStrings(["abc"])
    assert s.push("xa") == ("x", False)
    assert s.push("b") == ("", False)
    assert s.push("d") == ("abd", False)
    assert s.push("zab") == ("z", False)
    assert s.push("cq") == ("", True)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab日c", max_size=24), stops=st.lists(st.text(alphabet="ab日c", min_size=1, max_size=4),
       min_size=1, max_size=3), cuts=st.lists(st.integers(0, 24), max_size=8))
def test_stop_strings_property(text, stops, cuts):
    """However the text is cut into pieces: the output is the text up to the first stop string found at
    the first piece boundary where one is complete, and what is emitted before that never includes a
    character of that stop string."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {len(text)})
    s, out, stopped, prev = StopStrings(stops), [], False, 0
    for b in bounds:
        piece, stopped = s.push(text[prev:b])
        out.append(piece)
        prev = b
        if stopped:
            hits = [i for i in (text[:b].find(x) for x in stops) if i >= 0]
            assert "".join(out) == text[:min(hits)]
            return
        assert not any(x in text[:b] for x in stops)
    assert "".join(out) + s.flush() == text
