"""Sampling: each filter does what its name promises, seeds reproduce, bad arguments are refused."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from st_sdk.errors import InputError
from st_sdk.sampling import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, SamplingParams,
                             apply_repetition_penalty, candidate_distribution, sample)

V = 64


def logits(seed=0, n=V, scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def draws(x, params, n=400, seed=0, seen=None):
    rng = np.random.default_rng(seed)
    return np.array([sample(x, params, rng, seen) for _ in range(n)])


def test_defaults_are_the_smallthinker_authors():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p) == (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P) == (0.6, 20, 0.95)


def test_temperature_zero_is_argmax():
    for seed in range(5):
        x = logits(seed)
        assert set(draws(x, SamplingParams(temperature=0), n=20)) == {int(np.argmax(x))}


def test_top_k_one_equals_greedy():
    for seed in range(5):
        x = logits(seed)
        assert set(draws(x, SamplingParams(temperature=1.5, top_k=1, top_p=1.0), n=50)) == {int(np.argmax(x))}


def test_top_k_keeps_only_the_k_largest():
    x = logits(1)
    got = set(draws(x, SamplingParams(temperature=5.0, top_k=5, top_p=1.0), n=500))
    assert got <= set(np.argsort(-x)[:5].tolist())
    assert len(got) == 5   # a hot temperature reaches all of them


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    x = logits(2)
    ids, p = candidate_distribution(x, SamplingParams(temperature=1.0, top_k=0, top_p=0.8))
    full = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-full)
    mass = np.cumsum(full[order])
    n = int(np.searchsorted(mass, 0.8) + 1)
    assert ids.tolist() == order[:n].tolist()
    assert np.isclose(p.sum(), 1.0)


def test_min_p_removes_low_tokens():
    x = np.zeros(V, np.float32)
    x[:3] = [5.0, 4.5, 4.0]            # everything else is ~e^-4 .. e^-5 of the top
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05)
    assert set(draws(x, params, n=500)) <= {0, 1, 2}
    ids, p = candidate_distribution(x, params)
    assert set(ids.tolist()) == {0, 1, 2}
    # without min_p the low tokens do get drawn
    assert not set(draws(x, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), n=500)) <= {0, 1, 2}


def test_repetition_penalty_lowers_seen_ids_probability():
    x = np.array([2.0, -1.0, 1.0, 0.5, -2.0], np.float32)
    seen = np.array([True, True, False, False, False])
    y = apply_repetition_penalty(x, seen, 2.0)
    assert y[0] == 1.0 and y[1] == -2.0            # positive divided, negative multiplied
    assert np.array_equal(y[2:], x[2:])
    base = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    pen = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.5)
    ids0, p0 = candidate_distribution(x, base, seen)
    ids1, p1 = candidate_distribution(x, pen, seen)
    prob0 = dict(zip(ids0.tolist(), p0)), dict(zip(ids1.tolist(), p1))
    for i in (0, 1):
        assert prob0[1][i] < prob0[0][i]
    for i in (2, 3, 4):
        assert prob0[1][i] > prob0[0][i]
    # greedy also sees the penalty: the repeated argmax loses to the next best
    assert sample(x, SamplingParams(temperature=0, repetition_penalty=3.0), np.random.default_rng(), seen) == 2


def test_same_seed_same_draws_different_seed_differs():
    x = logits(3, scale=1.0)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    a, b, c = draws(x, p, 100, seed=7), draws(x, p, 100, seed=7), draws(x, p, 100, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_draws_follow_the_tempered_softmax():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    got = np.bincount(draws(x, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), n=n), minlength=4) / n
    assert np.allclose(got, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # temperature 2 flattens: p ~ sqrt(p)
    q = np.sqrt([0.5, 0.3, 0.15, 0.05]); q /= q.sum()
    got = np.bincount(draws(x, SamplingParams(temperature=2.0, top_k=0, top_p=1.0), n=n), minlength=4) / n
    assert np.allclose(got, q, atol=0.03)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(temperature="hot"), "temperature"),
])
def test_bad_arguments_are_refused_by_name(kw, name):
    with pytest.raises(InputError, match=name):
        SamplingParams(**kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.05, 3.0), top_k=st.integers(0, V + 5),
       top_p=st.floats(0.01, 1.0), min_p=st.floats(0.0, 1.0))
def test_candidates_are_a_normalised_top_prefix(seed, temperature, top_k, top_p, min_p):
    x = logits(seed)
    ids, p = candidate_distribution(x, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    assert len(ids) >= 1 and ids[0] == np.argmax(x)
    assert np.isclose(p.sum(), 1.0) and np.all(np.diff(p) <= 1e-12)
    assert set(ids.tolist()) == set(np.argsort(-x)[:len(ids)].tolist())   # a prefix of the ranking
    if 0 < top_k:
        assert len(ids) <= top_k


def test_top_k_on_a_real_sized_vocabulary_is_exact():
    x = logits(5, n=151936)
    for k in (1, 20, 500):
        ids, p = candidate_distribution(x, SamplingParams(temperature=1.0, top_k=k, top_p=1.0))
        assert ids.tolist() == np.argsort(-x, kind="stable")[:k].tolist()
        assert np.isclose(p.sum(), 1.0)
