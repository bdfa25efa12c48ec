"""Bad arguments to load/generate/logits are InputErrors naming the argument, never silently ignored or
turned into "auto", and other libraries' argument names get a "did you mean"."""
from __future__ import annotations

import pytest

import st_sdk
from st_sdk.errors import InputError


@pytest.fixture(scope="module")
def model(tiny_dir):
    return st_sdk.load(tiny_dir["gguf"], backend="numpy")


@pytest.mark.parametrize("backend", [5, "", " , ", [], [5], 1.5, {"numpy": 1}])
def test_backend_of_the_wrong_kind(tiny_dir, backend):
    with pytest.raises(InputError, match=r"backend"):
        st_sdk.load(tiny_dir["gguf"], backend=backend)


def test_backend_class_is_instantiated(tiny_dir):
    from st_sdk_backends.numpy.backend import NumpyBackend

    m = st_sdk.load(tiny_dir["gguf"], backend=NumpyBackend)
    assert m.backend.name == "numpy" and m.selection.rule == "explicit backend= argument"


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("dtype", ["nope", "float64", 16, "int8"])
def test_unknown_dtype(tiny_dir, backend, dtype):
    with pytest.raises(InputError, match=r"dtype: expected one of float32, bfloat16"):
        st_sdk.load(tiny_dir["gguf"], backend=backend, dtype=dtype)


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("n_threads", [0, -1, "2", 1.5, True])
def test_bad_thread_count(tiny_dir, backend, n_threads):
    with pytest.raises(InputError, match=r"n_threads: expected a positive integer"):
        st_sdk.load(tiny_dir["gguf"], backend=backend, n_threads=n_threads)


@pytest.mark.parametrize("context", [0, 1, -5, "512", 2.5])
def test_bad_context(tiny_dir, context):
    with pytest.raises(InputError, match=r"context: expected an integer number of tokens >= 2"):
        st_sdk.load(tiny_dir["gguf"], backend="numpy", context=context)


def test_context_beyond_the_model(tiny_dir):
    with pytest.raises(InputError, match=r"context=4096 exceeds the model's max_position_embeddings=2048"):
        st_sdk.load(tiny_dir["gguf"], backend="numpy", context=4096)


@pytest.mark.parametrize("flag", ["strict", "tune", "prefetch"])
def test_flags_are_booleans(tiny_dir, flag):
    with pytest.raises(InputError, match=rf"{flag}: expected True or False"):
        st_sdk.load(tiny_dir["gguf"], backend="numpy", **{flag: "yes"})


@pytest.mark.parametrize("path", [None, 5, ["a.gguf"], ""])
def test_load_path_of_the_wrong_kind(path):
    with pytest.raises(InputError, match=r"path"):
        st_sdk.load(path)


@pytest.mark.parametrize("name, hint", [("n_ctx", "context"), ("num_threads", "n_threads"),
                                        ("threads", "n_threads"), ("torch_dtype", "dtype"),
                                        ("device", "backend"), ("max_mem", "max_memory"), ("stict", "strict")])
def test_load_typo_gets_a_hint(tiny_dir, name, hint):
    with pytest.raises(InputError, match=rf"load: unknown argument '{name}'; did you mean {hint}="):
        st_sdk.load(tiny_dir["gguf"], **{name: 1})


@pytest.mark.parametrize("name, hint", [("max_tokens", "max_new_tokens"), ("max_length", "max_new_tokens"),
                                        ("n_predict", "max_new_tokens"), ("stop_sequences", "stop"),
                                        ("repeat_penalty", "repetition_penalty"), ("temprature", "temperature"),
                                        ("random_seed", "seed")])
def test_generate_typo_gets_a_hint(model, name, hint):
    for call in (lambda: model.generate("Hello", **{name: 3}), lambda: model.chat([{"role": "user", "content": "Hi"}],
                                                                                  **{name: 3}),
                 lambda: model.conversation(**{name: 3})):
        with pytest.raises(InputError, match=rf"unknown argument '{name}'; did you mean {hint}="):
            call()


@pytest.mark.parametrize("ids", [None, 5, "hello", [1, None], [[1, 2]], [1.5]])
def test_logits_of_something_other_than_ids(model, ids):
    with pytest.raises(InputError, match=r"ids"):
        model.logits(ids)


@pytest.mark.parametrize("prompt", ["\ud800", "ab\udfffc"])
def test_lone_surrogate_prompt(model, prompt):
    with pytest.raises(InputError, match=r"not valid Unicode"):
        model.generate(prompt, max_new_tokens=2)
    with pytest.raises(InputError, match=r"not valid Unicode"):
        model.chat([{"role": "user", "content": prompt}], max_new_tokens=2)


def test_the_embedder_arguments_are_known(tiny_dir, model):
    """Arguments load() and generate() take are not mistaken for typos (the unknown-argument check lists them)."""
    m = st_sdk.load(tiny_dir["gguf"], backend="numpy", chunk_size=4, context=64, prefetch=True, kv_dtype="f16")
    assert m.chunk_size == 4 and m.context == 64 and m.kv_dtype == "f16"
    with pytest.raises(InputError, match=r"chunk_size: expected a positive integer"):
        st_sdk.load(tiny_dir["gguf"], backend="numpy", chunk_size=0)
    r = model.generate("Hello", max_new_tokens=2, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={5: -1.0},
                       logits_processors=[lambda ids, x: x])
    assert len(r.token_ids) <= 2
