"""json_schema=, regex= and grammar= (GBNF and Lark): what comes out always matches; on every backend,
streamed or not."""
import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from generation_helpers import text_ids, tiny_model  # noqa: E402
from st_sdk.errors import InputError  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}
#: the same without blanks between tokens (llguidance's own option, passed through the schema): a
#: random model fills every allowed blank, and the 100-run test need not spend its time on them
COMPACT = {**SCHEMA, "x-guidance": {"whitespace_flexible": False}}


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_json_schema_holds_in_100_of_100_seeded_runs(model):
    prompt = text_ids("Person: ")
    results = [model.generate(prompt, json_schema=COMPACT, seed=s, temperature=1.0, max_new_tokens=400)
               for s in range(100)]
    bad = [r.text for r in results if not valid(r.text)]
    assert not bad, bad[:3]
    assert all(r.finish_reason == "stop" for r in results)     # the grammar completed
    assert len({r.text for r in results}) > 50                  # sampled, not one canned answer


def test_without_the_constraint_the_model_writes_no_json(model):
    prompt = text_ids("Person: ")
    assert not any(valid(model.generate(prompt, seed=s, temperature=1.0, max_new_tokens=80).text) for s in range(20))


def test_json_schema_streams_and_takes_json_text(model):
    prompt = text_ids("Person: ")
    whole = model.generate(prompt, json_schema=json.dumps(SCHEMA), seed=3, max_new_tokens=400)
    pieces = list(model.generate(prompt, json_schema=SCHEMA, seed=3, max_new_tokens=400, stream=True))
    assert "".join(pieces) == whole.text and valid(whole.text) and len(pieces) > 5


def test_regex(model):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for s in range(10):
        out = model.generate(text_ids("Code: "), regex=pattern, seed=s, temperature=1.0, max_new_tokens=50)
        assert re.fullmatch(pattern, out.text), out.text


GBNF = r'''
root   ::= answer " " number
answer ::= "yes" | "no"
number ::= [1-9] [0-9]?
'''

LARK = r'''
start: answer " " NUMBER
answer: "yes" | "no"
NUMBER: /[1-9][0-9]?/
'''


@pytest.mark.parametrize("grammar", [GBNF, LARK], ids=["gbnf", "lark"])
def test_grammar(model, grammar):
    for s in range(10):
        out = model.generate(text_ids("Q: "), grammar=grammar, seed=s, temperature=1.0, max_new_tokens=20)
        assert re.fullmatch(r"(yes|no) [1-9][0-9]?", out.text), out.text


def test_constraint_with_logit_bias_and_greedy(model):
    # the bias pushes toward "no" but cannot break the grammar
    out = model.generate(text_ids("Q: "), grammar=GBNF, temperature=0, logit_bias={ord("n"): 50.0, ord("x"): 99.0})
    assert out.text.startswith("no ")


@pytest.mark.parametrize("backend", ["numpy", "c", "torch", "jax"])
def test_file_model_with_its_bpe_tokenizer_on_each_backend(tiny_dir, backend):
    """The synthetic model files carry a merged BPE (multi-byte tokens); the constraint works on the
    logits every backend returns, streamed. (JAX compiles each new sequence length: a short regex.)"""
    import st_sdk
    from st_sdk.registry import get_registry

    cls = get_registry().backends().get(backend)
    if cls is None or not cls().is_available():
        pytest.skip(f"backend {backend} is not available here")
    m = st_sdk.load(tiny_dir["gguf"], backend=backend)
    if backend == "jax":
        text = "".join(m.generate("Hello", regex=r"[a-z]{2}[0-9]", seed=1, max_new_tokens=8, stream=True))
        assert re.fullmatch(r"[a-z]{2}[0-9]", text), text
    else:
        text = "".join(m.generate("Hello", json_schema=COMPACT, seed=1, max_new_tokens=300, stream=True))
        assert valid(text), (backend, text)


@pytest.mark.parametrize("kw, match", [
    (dict(json_schema="{not json"), "json_schema"),
    (dict(json_schema=42), "json_schema"),
    (dict(regex="([a-z"), "regex"),
    (dict(regex=""), "regex"),
    (dict(grammar="root ::= undefined_rule"), "grammar"),
    (dict(json_schema={"type": "object"}, regex="a"), "at most one"),
])
def test_bad_constraints_are_refused_before_any_work(model, kw, match):
    with pytest.raises(InputError, match=match):
        model.generate("Hi", **kw)


def test_a_model_without_tokenizer_is_refused():
    m = tiny_model(seed=0)
    m.tokenizer = None
    with pytest.raises(InputError, match="tokenizer"):
        m.generate([1, 2, 3], regex="[a-z]+")


def test_without_llguidance_the_error_says_how_to_install(model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)     # import llguidance -> ImportError
    with pytest.raises(InputError, match=r"st-sdk\[structured\]"):
        model.generate("Hi", regex="[a-z]+")
