"""`st-sdk serve`'s app, through the official `openai` client against a server on a loopback port:
plain and streamed chat and completions, bad input in OpenAI's error shape, the API key, a full
queue, a client that goes away, concurrency, /health and /metrics."""
import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
openai = pytest.importorskip("openai")

from generation_helpers import c_available, tiny_model  # noqa: E402
from st_sdk.serving import create_app  # noqa: E402

NAME = "tiny-test"
KEY = "sk-test"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


class Server:
    """The app on 127.0.0.1:<free port> in a thread; stops by itself when the test module ends."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the server did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def model():
    # the C backend's batched step equals the one-sequence step bit for bit (see test_engine.py)
    m = tiny_model(seed=0, backend="c" if c_available() else "numpy")
    m.engine.configure(max_batch=4, max_queue=16)
    return m


@pytest.fixture(scope="module")
def server(model):
    s = Server(create_app(model, model_name=NAME, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server, method, path, body=None, key=KEY, stream=False):
    """A plain HTTP call (urllib: no client-side checks), returning (status, headers, parsed body)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url + path, method=method,
                                 data=None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode()),
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read().decode()
            return r.status, {k.lower(): v for k, v in r.headers.items()}, (data if stream or not data.startswith("{") else json.loads(data))
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read().decode())


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


# ---- what comes out ---------------------------------------------------------------------------------
def test_models_lists_the_one_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_equals_the_library_and_reports_usage(client, model):
    want = model.chat(MESSAGES, max_new_tokens=8, temperature=0, ignore_eos=True)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_ids) and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(want.prompt_ids) + 8


def test_streamed_chat_joins_to_the_plain_answer(client):
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=10, seed=3, temperature=1.0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_sampling_options_stop_seed_and_logit_bias(client):
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=12, temperature=1.3, seed=7, extra_body={"ignore_eos": True})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    # a +100 bias on byte "Q" makes it the only token sampled
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, logit_bias={str(ord("Q")): 100},
                                       **GREEDY)
    assert r.choices[0].message.content == "QQQQQ"
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, logit_bias={str(ord("Q")): 100},
                                       stop=["QQQ"], **GREEDY)
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"
    # vLLM / llama-server extensions are accepted
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3, seed=1,
                                       extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "ignore_eos": True, "some_unknown_field": [1, 2]})
    assert r.usage.completion_tokens == 3


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2,
                                       **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)   # greedy picks the top one


def test_completions_plain_streamed_lists_and_echo(client, model):
    want = model.generate("Once upon", max_new_tokens=6, temperature=0, ignore_eos=True)
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=6, **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(want.prompt_ids) and r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=NAME, prompt="Once upon", max_tokens=6, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    r = client.completions.create(model=NAME, prompt=["Once upon", "abc"], max_tokens=3, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == want.text[:len(r.choices[0].text)]
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=2, echo=True, logprobs=1, **GREEDY)
    assert r.choices[0].text.startswith("Once upon")
    assert len(r.choices[0].logprobs.token_logprobs) == 2
    r = client.completions.create(model=NAME, prompt=[1, 2, 3], max_tokens=2, n=2, seed=5, temperature=1.0)
    assert len(r.choices) == 2


# ---- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"messages": MESSAGES, "temperature": 5}, "temperature"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),                 # past the context
    ({"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": MESSAGES, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": MESSAGES, "stop": 3}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
])
def test_bad_parameters_answer_400_in_openai_shape(server, body, param):
    status, _, out = raw(server, "POST", "/v1/chat/completions", {"model": NAME, **body})
    assert status == 400
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    assert param.split("[")[0] in out["error"]["message"]


def test_client_sees_errors_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MESSAGES, top_p=3)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    bad_key = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_malformed_json_and_unknown_routes(server):
    status, _, out = raw(server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and out["error"]["code"] == "invalid_json"
    status, _, out = raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in out
    status, _, _ = raw(server, "GET", "/v1/models", key=None)
    assert status == 401
    status, _, out = raw(server, "GET", "/health", key=None)   # open without the key
    assert status == 200 and out["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after(model, server):
    gate = threading.Event()
    feed = model.feed_batch
    model.feed_batch = lambda sessions, ids: (gate.wait(20), feed(sessions, ids))[1]
    old = model.engine.max_batch, model.engine.max_queue
    model.engine.configure(max_batch=1, max_queue=0)
    results = []
    try:
        t = threading.Thread(target=lambda: results.append(raw(server, "POST", "/v1/completions",
                                                               {"prompt": "a", "max_tokens": 2})))
        t.start()
        deadline = time.time() + 10
        while model.engine.running == 0 and time.time() < deadline:
            time.sleep(0.01)
        status, headers, out = raw(server, "POST", "/v1/completions", {"prompt": "b", "max_tokens": 2})
        assert status == 503 and headers.get("retry-after") == "1" and out["error"]["code"] == "queue_full"
    finally:
        gate.set()
        model.feed_batch = feed
        t.join(30)
        model.engine.configure(max_batch=old[0], max_queue=old[1])
    assert results[0][0] == 200


def test_a_client_that_goes_away_cancels_its_request(client, model):
    before = model.engine.stats.finished["cancelled"]
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1500, stream=True, **GREEDY)
    n = 0
    for _ in stream:
        n += 1
        if n == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while model.engine.stats.finished["cancelled"] == before and time.time() < deadline:
        time.sleep(0.02)
    assert model.engine.stats.finished["cancelled"] == before + 1
    while model.engine.running and time.time() < deadline:
        time.sleep(0.02)
    assert model.engine.running == 0


def test_concurrent_clients_get_what_each_gets_alone_and_share_steps(client, model):
    if model.backend.name != "c":
        pytest.skip("token-for-token equality needs the C backend's bit-exact batched step")
    prompts = ["abc", "The quick brown fox", "1 2 3", "hello"]
    kw = dict(max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    want = [client.completions.create(model=NAME, prompt=p, seed=i, **kw).choices[0].text
            for i, p in enumerate(prompts)]
    rows0, steps0 = model.engine.stats.step_rows, model.engine.stats.steps
    got = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def work(i):
        barrier.wait()
        got[i] = client.completions.create(model=NAME, prompt=prompts[i], seed=i, **kw).choices[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    assert model.engine.stats.step_rows - rows0 > model.engine.stats.steps - steps0


def test_metrics_count_requests_tokens_and_batches(server, client):
    client.completions.create(model=NAME, prompt="abc", max_tokens=2, **GREEDY)
    status, _, text = raw(server, "GET", "/metrics", key=None, stream=True)
    assert status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["st_sdk_requests_total"] >= 1 and values["st_sdk_generation_tokens_total"] >= 2
    assert values["st_sdk_steps_total"] >= 1 and "st_sdk_queue_depth" in values and "st_sdk_batch_size" in values
    assert values['st_sdk_http_requests_total{route="/v1/completions",code="200"}'] >= 1


def test_response_format_json_schema_constrains_the_answer(client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=200, temperature=1.0, seed=2,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3, presence_penalty=0.5,
                                       frequency_penalty=0.5, **GREEDY)
    assert r.usage.completion_tokens == 3


def test_st_sdk_serve_command_serves_a_file_within_a_memory_budget(tiny_dir):
    """`st-sdk serve FILE` as a user runs it: bad options fail with a message, then a server on a
    loopback port under --max-memory answers two concurrent requests and stops on SIGTERM."""
    import subprocess
    import sys

    from st_sdk.cli import main

    path = str(tiny_dir["gguf"])
    assert main(["serve", path, "--parallel", "0"]) == 1
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from st_sdk.cli import main; sys.exit(main())",
                             "serve", path, "--port", str(port), "--backend", "numpy", "--threads", "1",
                             "--parallel", "2", "--context", "64", "--max-memory", "2GiB", "--model-name", "tiny",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                assert [m.id for m in c.models.list().data] == ["tiny"]
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "st-sdk serve did not start"
                time.sleep(0.2)
        # one call before the threads: the openai client's first build of its response models is
        # not thread-safe
        c.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1, **GREEDY)
        out = [None, None]

        def work(i):
            out[i] = c.completions.create(model="tiny", prompt=[5 + i, 6, 7], max_tokens=4, **GREEDY)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.usage.completion_tokens for r in out] == [4, 4]
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt=[1], max_tokens=-1)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
