"""`st-sdk serve MODEL --ray --replicas 2` as a user runs it: one local Ray instance for the module
(the command's own), two replicas of the tiny model behind Ray Serve's proxy on a loopback port, asked
through the official `openai` client: concurrent plain and streamed chats, the app's errors, and a
replica killed mid-run being replaced. Without Ray, `--ray` says how to get it."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib.util import find_spec

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
openai = pytest.importorskip("openai")

from generation_helpers import c_available  # noqa: E402

needs_ray = pytest.mark.skipif(find_spec("ray") is None, reason="Ray is not installed (pip install -e '.[ray]')")
NAME = "tiny"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
REPLICA = "ray::ServeReplica:st-sdk"
# Ray Serve's own config classes use pydantic features pydantic 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")   # the process title Ray gives each replica of the st-sdk app


def test_ray_flag_without_ray_says_how_to_get_it(tiny_dir, monkeypatch, capsys):
    from st_sdk.cli import main

    for m in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` fails as if it were not installed
    assert main(["serve", str(tiny_dir["gguf"]), "--ray", "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("st-sdk: error: ") and 'pip install "st-sdk[ray]"' in err and "Traceback" not in err
    assert main(["serve", str(tiny_dir["gguf"]), "--replicas", "2"]) == 1   # Ray options need --ray
    assert "need --ray" in capsys.readouterr().err


@needs_ray
def test_deployment_passes_threads_memory_and_autoscaling_to_ray(tiny_dir):
    from st_sdk.serving.ray import deployment

    auto = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    d = deployment(tiny_dir["gguf"], n_threads=2, max_memory="1GiB", parallel=4, max_queue=12,
                   autoscaling_config=auto, options={"health_check_period_s": 7})._bound_deployment
    assert d.ray_actor_options["num_cpus"] == 2 and d.ray_actor_options["memory"] == 2**30
    assert d.max_ongoing_requests == 16
    cfg = d._deployment_config
    assert (cfg.autoscaling_config.min_replicas, cfg.autoscaling_config.max_replicas) == (1, 3)
    assert cfg.health_check_period_s == 7
    d = deployment(tiny_dir["gguf"], num_replicas=3, ray_actor_options={"num_cpus": 0.5})._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_cpus"] == 0.5


class RayServer:
    """`st-sdk serve FILE --ray --replicas 2` on 127.0.0.1:<free port>; SIGTERM stops Serve and its
    local Ray instance (whatever is left of its process tree is killed after that)."""

    def __init__(self, path: str):
        import psutil

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from st_sdk.cli import main; sys.exit(main())", "serve", path,
             "--ray", "--replicas", "2", "--threads", "1", "--port", str(self.port), "--parallel", "4",
             "--context", "256", "--model-name", NAME, "--backend", "c" if c_available() else "numpy",
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.ps = psutil.Process(self.proc.pid)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 240
        while True:
            assert self.proc.poll() is None, f"st-sdk serve --ray exited: {self.output()}"
            try:
                if [m.id for m in self.client.models.list().data] == [NAME] and len(self.replicas()) == 2:
                    return
            except (openai.APIConnectionError, openai.APIStatusError):
                pass
            assert time.time() < deadline, f"st-sdk serve --ray did not start: {self.output()}"
            time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def replicas(self) -> list:
        """The replica processes: this command's descendants titled as Ray titles them."""
        out = []
        for p in self.ps.children(recursive=True):
            try:
                if " ".join(p.cmdline()).startswith(REPLICA):
                    out.append(p)
            except Exception:   # gone meanwhile
                pass
        return out

    def stop(self) -> None:
        tree = self.ps.children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in tree:
            try:
                p.kill()
            except Exception:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def ray_server(tiny_dir):
    if find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    pytest.importorskip("psutil")
    s = RayServer(str(tiny_dir["gguf"]))
    # the openai client builds its pydantic response models on first use, and that build is not
    # thread-safe ("type object 'ChatCompletion' has no attribute '__pydantic_core_schema__'" in one
    # of 16 first calls): one call of each kind first, so the tests' threads test the server alone
    try:
        chat(s.client, 0, stream=False), chat(s.client, 0, stream=True)
        yield s
    finally:
        s.stop()


def chat(client, i: int, stream: bool, max_tokens: int = 8):
    kw = dict(model=NAME, messages=[{"role": "user", "content": f"Tell me about {i}."}], max_tokens=max_tokens,
              **GREEDY)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == max_tokens
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def together(fn, n: int) -> list:
    out: list = [None] * n

    def work(i):
        try:
            out[i] = fn(i)
        except Exception as e:   # noqa: BLE001 - reported by the caller's assert
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


@needs_ray
def test_two_replicas_answer_16_concurrent_streamed_chats_and_plain_ones(ray_server):
    c = ray_server.client
    plain = together(lambda i: chat(c, i, stream=False), 16)
    streamed = together(lambda i: chat(c, i, stream=True), 16)
    assert not [e for e in plain + streamed if isinstance(e, Exception)], plain + streamed
    # greedy: both replicas hold the same weights, so a streamed answer joins to the plain one
    assert streamed == plain and all(isinstance(t, str) and t for t in plain)
    assert len(ray_server.replicas()) == 2


def raw(url: str, method: str, path: str, body=None):
    req = urllib.request.Request(url + path, method=method, headers={"Content-Type": "application/json"},
                                 data=None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode()))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


@needs_ray
def test_routes_and_errors_are_the_apps(ray_server):
    c = ray_server.client
    assert c.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="not found"):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], top_p=3)
    assert e.value.body["param"] == "top_p"
    status, out = raw(ray_server.url, "POST", "/v1/completions", b"{not json")
    assert status == 400 and out["error"]["code"] == "invalid_json"
    status, out = raw(ray_server.url, "GET", "/health")
    assert status == 200 and json.loads(out)["status"] == "ok"
    r = c.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3


@needs_ray
def test_a_replica_killed_mid_run_is_replaced_and_later_requests_succeed(ray_server):
    c = ray_server.client
    before = ray_server.replicas()
    assert len(before) == 2
    # long streams on both replicas (the router spreads them), then one replica dies mid-run
    started = threading.Semaphore(0)

    def long_stream(i):
        stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"go {i}"}],
                                           max_tokens=200, stream=True, **GREEDY)
        n = 0
        for chunk in stream:
            n += 1
            if n == 3:
                started.release()
        return n

    runs: list = []
    t = threading.Thread(target=lambda: runs.extend(together(long_stream, 4)))
    t.start()
    for _ in range(4):
        assert started.acquire(timeout=120), "the streams did not start"
    victim = before[0]
    os.kill(victim.pid, signal.SIGKILL)
    t.join(300)
    assert len(runs) == 4   # each stream finished or failed; none hangs
    deadline = time.time() + 180
    while True:
        now = ray_server.replicas()
        if len(now) == 2 and victim.pid not in [p.pid for p in now]:
            break
        assert time.time() < deadline, f"the killed replica was not replaced: {ray_server.output()}"
        time.sleep(0.5)
    while True:   # the new replica is up once it loaded its model; requests go to the live one meanwhile
        try:
            chat(c, 0, stream=False)
            break
        except openai.APIError:
            assert time.time() < deadline, f"no answer after the replica was replaced: {ray_server.output()}"
            time.sleep(0.5)
    later = together(lambda i: chat(c, 100 + i, stream=i % 2 == 0), 8)
    assert all(isinstance(x, str) and x for x in later), later
