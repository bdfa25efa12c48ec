"""logit_bias, presence/frequency penalties, logits_processors, and the Sampler a scheduler drives."""
import numpy as np
import pytest

from generation_helpers import text_ids, tiny_model
from st_sdk.errors import InputError
from st_sdk.generation import Options, Sampler
from st_sdk.sampling import SamplingParams, apply_presence_frequency, candidate_distribution

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_logit_bias_forces_and_bans(model):
    prompt = text_ids("Hi")
    forced = model.generate(prompt, max_new_tokens=5, logit_bias={ord("x"): 1e4}, **GREEDY)
    assert forced.text == "xxxxx"
    plain = model.generate(prompt, max_new_tokens=5, **GREEDY)
    first = plain.token_ids[0]
    banned = model.generate(prompt, max_new_tokens=5, logit_bias={first: float("-inf")}, **GREEDY)
    assert first not in banned.token_ids
    # string keys (JSON objects, as OpenAI sends them) are accepted
    assert model.generate(prompt, max_new_tokens=2, logit_bias={str(ord("y")): 1e4}, **GREEDY).text == "yy"


def test_logit_bias_is_added_to_the_logits(model):
    x = model.logits(text_ids("Hi"))[-1]
    s = Sampler(model, Options.parse(logit_bias={3: 2.5, 7: -1.0}), text_ids("Hi"))
    y = s.process(x)
    want = x.copy()
    want[3] += 2.5
    want[7] -= 1.0
    np.testing.assert_array_equal(y, want)


def test_presence_and_frequency_follow_openai():
    x = np.zeros(8, np.float32)
    ids, counts = np.array([1, 4]), np.array([3.0, 1.0], np.float32)
    y = apply_presence_frequency(x, ids, counts, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(y, [0, -1.25, 0, 0, -0.75, 0, 0, 0])
    assert apply_presence_frequency(x, ids, counts, 0.0, 0.0) is x


def test_frequency_penalty_stops_a_greedy_loop(model):
    prompt = text_ids("Hi")
    loop = model.generate(prompt, max_new_tokens=40, logit_bias={ord("a"): 5.0}, **GREEDY)
    assert loop.text.count("a") > 30
    varied = model.generate(prompt, max_new_tokens=40, logit_bias={ord("a"): 5.0}, frequency_penalty=1.0, **GREEDY)
    assert varied.text.count("a") < 10
    pres = model.generate(prompt, max_new_tokens=40, logit_bias={ord("a"): 5.0}, presence_penalty=1e3, **GREEDY)
    assert pres.text.count("a") == 1      # once seen, never again


def test_logits_processors_see_the_ids_and_change_the_logits(model):
    prompt = text_ids("Hi")
    seen = []

    def force_next_byte(token_ids, logits):
        seen.append(token_ids.copy())
        out = np.full_like(logits, -np.inf)
        out[ord("A") + (len(token_ids) - len(prompt)) % 26] = 0.0
        return out

    res = model.generate(prompt, max_new_tokens=4, logits_processors=[force_next_byte], **GREEDY)
    assert res.text == "ABCD"
    assert [list(s) for s in seen] == [prompt + res.token_ids[:i] for i in range(4)]
    assert all(s.dtype == np.int64 for s in seen)


def test_bad_controls_are_refused(model):
    with pytest.raises(InputError, match="logit_bias"):
        model.generate("Hi", logit_bias={10**6: 1.0})
    with pytest.raises(InputError, match="logit_bias"):
        model.generate("Hi", logit_bias=[1, 2])
    with pytest.raises(InputError, match=r"logit_bias\[3\]"):
        model.generate("Hi", logit_bias={3: float("nan")})
    with pytest.raises(InputError, match="presence_penalty"):
        model.generate("Hi", presence_penalty="high")
    with pytest.raises(InputError, match="logits_processors"):
        model.generate("Hi", logits_processors=[42])
    with pytest.raises(InputError, match=r"logits_processors\[0\]"):
        model.generate("Hi", logits_processors=[lambda ids, x: x[:3]], max_new_tokens=2)
    with pytest.raises(InputError, match="no token is allowed"):
        model.generate("Hi", logits_processors=[lambda ids, x: np.full_like(x, -np.inf)], max_new_tokens=2)


def test_masked_ids_are_never_drawn():
    x = np.zeros(100, np.float32)
    x[:95] = -np.inf
    for params in (SamplingParams(temperature=1.0, top_k=20, top_p=1.0), SamplingParams(temperature=1.0, top_k=0)):
        ids, p = candidate_distribution(x, params)
        assert set(ids) == {95, 96, 97, 98, 99} and np.isclose(p.sum(), 1)


def test_sampler_driven_by_hand_equals_generate(model):
    """What a batching scheduler does: its own forward, the sampler one token at a time."""
    prompt = text_ids("Once")
    kw = dict(max_new_tokens=12, seed=5, temperature=0.9, stop="zz", logprobs=2, presence_penalty=0.3)
    want = model.generate(prompt, **kw)
    sampler = Sampler(model, Options.parse(**kw), prompt, room=100)
    session = model.session()
    logits = session.feed(prompt)
    pieces = []
    while not sampler.finished:
        step = sampler.step(logits)
        pieces.append(step.text)
        if not sampler.finished:
            logits = session.feed([step.token])
    assert sampler.token_ids == want.token_ids and "".join(pieces) == want.text
    assert sampler.finish_reason == want.finish_reason and sampler.logprobs == want.logprobs
    assert step.finish_reason == want.finish_reason and step.top_logprobs == want.top_logprobs[-1]


# ---- a list of prompts ------------------------------------------------------------------------------
def test_a_list_of_prompts_gives_each_ones_result(model):
    kw = dict(max_new_tokens=6, seed=4, temperature=0.9, logprobs=True)
    prompts = ["Hello", "The cat sat", "Hello there"]
    batch = model.generate(prompts, **kw)
    assert isinstance(batch, list) and len(batch) == 3
    for p, res in zip(prompts, batch):
        model.prompt_cache.clear()
        alone = model.generate(p, **kw)
        assert res.text == alone.text and res.token_ids == alone.token_ids and res.logprobs == alone.logprobs
    ids = [text_ids("ab"), text_ids("abc")]
    assert [r.token_ids for r in model.generate(ids, **kw)] == [model.generate(i, **kw).token_ids for i in ids]
    assert isinstance(model.generate(text_ids("ab"), **kw), str)    # a list of ids is one prompt


def test_a_list_of_prompts_is_checked_first(model):
    with pytest.raises(InputError, match="not a mix"):
        model.generate(["a", [1, 2]])
    with pytest.raises(InputError, match="prompt"):
        model.generate(["a", ""])
    with pytest.raises(InputError, match="stream"):
        model.generate(["a", "b"], stream=True)
