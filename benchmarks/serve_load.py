"""Load test of `st-sdk serve` (and, side by side, llama-cpp-python's server) on one model file.

Starts each server as a subprocess on a free 127.0.0.1 port, then for each concurrency level sends a
bounded number of streamed chat completions through the official `openai` client, `C` at a time, and
reports: aggregate completion tokens/s (tokens / wall time of the level), p50/p99 time to first token,
p50/p99 time between tokens, errors, the engine's mean batch (st-sdk, from /metrics) and the server's
RSS. `--soak N` then sends N more requests (16 at a time) and reports the RSS after warm-up and at the
end. `--latency N` first sends N one-token chats, then N GET /v1/models, one after another, and
reports their latency. Everything stops by itself; the servers are terminated at exit.

    python benchmarks/serve_load.py 4b-a0.6b-q4_0-seed0.gguf \\
        --threads 2 --levels 1,2,4,8,16 --server st-sdk,llama-cpp

The server `st-sdk-ray` is `st-sdk serve --ray --replicas R --threads T` (a local Ray instance, R
replicas of T threads each; the Ray extra): with `--threads 2 --replicas 2 --server st-sdk,st-sdk-ray`,
one process of 2 threads against 2 replicas of 1 thread (`--replica-threads` otherwise). Its mean
batch is not reported (/metrics answers for one replica) and its RSS is the replicas' sum.

The weights of the synthesised files are random, so the text is meaningless; end-of-sequence is
ignored (st-sdk) or vanishingly rare (llama-cpp-python), so every request generates --max-tokens
tokens. Bytes read per step are computed from the file's tensor sizes: the dense weights (attention,
routers, norms, embedding rows, head) once per step, plus each layer's distinct experts, whose
expected number for B tokens under uniform routing is E * (1 - (1 - k/E)^B).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

TOPICS = ["a lighthouse", "the sea", "a clock", "mountains", "a small robot", "rain", "a library", "bread"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Server:
    def __init__(self, kind: str, model: str, threads: int, parallel: int, context: int, replicas: int = 1):
        self.kind, self.port = kind, free_port()
        if kind.startswith("st-sdk"):
            cmd = [sys.executable, "-c", "import sys; from st_sdk.cli import main; sys.exit(main())", "serve", model, "--port", str(self.port), "--threads",
                   str(threads), "--parallel", str(parallel), "--context", str(context), "--max-queue", "1024",
                   "--backend", "c", "--log-level", "warning", "--model-name", "m"]
            if kind == "st-sdk-ray":
                cmd += ["--ray", "--replicas", str(replicas)]
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port",
                   str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--interrupt_requests", "False", "--n_ctx", str(context), "--model_alias", "m"]
        self.cmd = cmd
        # the server's log goes to a file: a pipe nobody reads fills up and stops a chatty server
        # (llama.cpp logs every tensor while it loads)
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{kind} server exited: {self.log.read()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{kind} server did not start in 600 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def rss(self) -> int:
        import psutil

        proc = psutil.Process(self.proc.pid)
        if self.kind != "st-sdk-ray":
            return proc.memory_info().rss
        return sum(p.memory_info().rss for p in proc.children(recursive=True)   # the replicas
                   if " ".join(p.cmdline()).startswith("ray::ServeReplica"))

    def uss(self) -> int:
        """Memory unique to the server's process (or its replicas): RSS less the pages shared with
        other processes, such as the model file's page cache that replicas on one machine share."""
        import psutil

        proc = psutil.Process(self.proc.pid)
        if self.kind != "st-sdk-ray":
            return proc.memory_full_info().uss
        return sum(p.memory_full_info().uss for p in proc.children(recursive=True)
                   if " ".join(p.cmdline()).startswith("ray::ServeReplica"))

    def metrics(self) -> dict[str, float]:
        if self.kind != "st-sdk":
            return {}
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def latency(server: Server, n: int) -> dict:
    """n one-token chats one after another (plain JSON answers), and n GET /v1/models (no model work):
    the per-request cost of the path."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    chats, routes = [], []
    for i in range(n):
        t0 = time.perf_counter()
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=1,
                                       temperature=0, extra_body={"ignore_eos": True})
        chats.append(time.perf_counter() - t0)
    for i in range(n):
        t0 = time.perf_counter()
        client.models.list()
        routes.append(time.perf_counter() - t0)
    return {"server": server.kind, "kind": "latency", "requests": n, "p50_s": float(np.percentile(chats, 50)),
            "p90_s": float(np.percentile(chats, 90)), "mean_s": float(np.mean(chats)),
            "models_p50_s": float(np.percentile(routes, 50)), "models_p90_s": float(np.percentile(routes, 90)),
            "loadavg": loadavg()}


def one_request(client, i: int, max_tokens: int, st_sdk: bool) -> dict:
    extra = {"ignore_eos": True, "top_k": 20} if st_sdk else {"top_k": 20}
    t0 = time.perf_counter()
    times, n, usage = [], 0, None
    try:
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"Tell me a story about {TOPICS[i % len(TOPICS)]} ({i})."}],
            max_tokens=max_tokens, temperature=0.6, top_p=0.95, seed=i, stream=True,
            stream_options={"include_usage": True} if st_sdk else None, extra_body=extra)
        for chunk in stream:
            # a token: any chunk with content that is not the opening role chunk (llama-cpp-python sends
            # one chunk per token, with content "" for a token without text of its own)
            d = chunk.choices[0].delta if chunk.choices else None
            if d is not None and d.content is not None and not d.role and (d.content or not st_sdk):
                times.append(time.perf_counter())
                n += 1
            if getattr(chunk, "usage", None):
                usage = chunk.usage.completion_tokens
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    tokens = usage if usage is not None else n
    return {"ttft": times[0] - t0 if times else float("nan"), "gaps": list(np.diff(times)), "tokens": tokens,
            "end": time.perf_counter()}


def run_level(server: Server, concurrency: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    results: list[dict] = [None] * requests   # type: ignore[list-item]
    nxt = iter(range(requests))
    lock = threading.Lock()
    m0 = server.metrics()

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = one_request(client, i, max_tokens, server.kind.startswith("st-sdk"))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    m1 = server.metrics()
    steps = m1.get("st_sdk_steps_total", 0) - m0.get("st_sdk_steps_total", 0)
    rows = m1.get("st_sdk_step_sequences_total", 0) - m0.get("st_sdk_step_sequences_total", 0)
    out = {"server": server.kind, "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
           "errors": requests - len(ok), "wall_s": wall, "completion_tokens": tokens,
           "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
           "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else float("nan"),
           "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else float("nan"),
           "token_gap_p50_s": float(np.percentile(gaps, 50)) if gaps else float("nan"),
           "token_gap_p99_s": float(np.percentile(gaps, 99)) if gaps else float("nan"),
           "mean_batch": rows / steps if steps else float("nan"), "loadavg": loadavg()}
    errs = [r["error"] for r in results if "error" in r]
    if errs:
        out["first_error"] = errs[0]
    return out


def bytes_per_step(model_path: str, levels: list[int]) -> list[tuple[int, float]]:
    from st_sdk.weights import open_model

    mf = open_model(model_path)
    cfg, params = mf.config, mf.params()
    E, k, L = cfg.moe_num_primary_experts, cfg.moe_num_active_primary_experts, cfg.num_hidden_layers
    expert = sum(getattr(params.layers[0], p).raw.nbytes for p in ("gate", "up", "down")) / E
    dense = sum(p.raw.nbytes for name, p in params.all() if name.split(".")[-1] not in ("gate", "up", "down")
                and name != "embed")
    dense += params.head.raw.nbytes if params.head is params.embed else 0   # the tied head reads the whole table
    return [(B, dense + L * E * (1 - (1 - k / E) ** B) * expert) for B in levels]


def fmt_row(r: dict) -> str:
    return (f"{r['server']:10s} C={r['concurrency']:<3d} {r['requests']:4d} req  {r['completion_tokens']:6d} tok "
            f"{r['wall_s']:7.1f} s  {r['tokens_per_s']:7.2f} tok/s  ttft p50 {r['ttft_p50_s']:6.2f} p99 "
            f"{r['ttft_p99_s']:6.2f} s  gap p50 {r['token_gap_p50_s'] * 1e3:6.1f} p99 {r['token_gap_p99_s'] * 1e3:7.1f} ms  "
            f"batch {r['mean_batch']:5.2f}  errors {r['errors']}  load {r['loadavg']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .gguf file, or the name of one in $ST_SDK_CACHE_DIR/models")
    p.add_argument("--server", default="st-sdk,llama-cpp", help="comma list: st-sdk, st-sdk-ray, llama-cpp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2, help="st-sdk-ray: Ray Serve replicas")
    p.add_argument("--replica-threads", type=int, default=0, help="st-sdk-ray: threads per replica "
                   "(default --threads / --replicas)")
    p.add_argument("--latency", type=int, default=0, help="first, this many one-token chats one at a time")
    p.add_argument("--parallel", type=int, default=16, help="st-sdk --parallel (sequences per step)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default 2 x concurrency, >= 4)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--soak", type=int, default=0, help="then this many requests, 16 at a time, RSS tracked")
    p.add_argument("--soak-tokens", type=int, default=16)
    p.add_argument("--soak-server", default="st-sdk", help="which servers get the soak (comma list)")
    p.add_argument("--json", default=None, help="write every result to this file")
    a = p.parse_args(argv)
    if not os.path.exists(a.model):   # a synthetic file's name: look in st-sdk's models folder
        from st_sdk.bench.files import models_dir

        if (models_dir() / a.model).exists():
            a.model = str(models_dir() / a.model)
    levels = [int(x) for x in a.levels.split(",")]
    print(f"# serve_load: model {a.model}, threads {a.threads}, st-sdk --parallel {a.parallel}, context {a.context}, "
          f"levels {levels}, requests/level {a.requests or '2 x C'}, max_tokens {a.max_tokens}, streamed chat, "
          f"temperature 0.6 top-p 0.95 top-k 20; load {loadavg()}", flush=True)
    for B, n in bytes_per_step(a.model, levels):
        print(f"# weight bytes read per step, {B:2d} sequences: {n / 2**20:8.1f} MiB ({n / B / 2**20:7.1f} MiB per token)")
    records = []
    for kind in a.server.split(","):
        threads = (a.replica_threads or max(1, a.threads // a.replicas)) if kind == "st-sdk-ray" else a.threads
        server = Server(kind, a.model, threads, a.parallel, a.context, a.replicas)
        try:
            print(f"# {kind}: {' '.join(server.cmd[1:])}", flush=True)
            rss0 = server.rss()
            run_level(server, 1, 2, 4)   # warm-up
            if a.latency:
                r = latency(server, a.latency)
                records.append(r)
                print(f"{kind:10s} one-token chat latency over {a.latency} requests: p50 {r['p50_s'] * 1e3:.1f} ms, "
                      f"p90 {r['p90_s'] * 1e3:.1f} ms, mean {r['mean_s'] * 1e3:.1f} ms; GET /v1/models p50 "
                      f"{r['models_p50_s'] * 1e3:.1f} ms, p90 {r['models_p90_s'] * 1e3:.1f} ms  load {r['loadavg']}", flush=True)
            for c in levels:
                r = run_level(server, c, a.requests or max(4, 2 * c), a.max_tokens)
                r["rss_mib"] = server.rss() / 2**20
                records.append(r)
                print(fmt_row(r) + f"  rss {r['rss_mib']:.0f} MiB", flush=True)
            print(f"# {kind}: RSS {server.rss() / 2**20:.0f} MiB, of which unique to its process(es) "
                  f"{server.uss() / 2**20:.0f} MiB", flush=True)
            if a.soak and kind in a.soak_server.split(","):
                warm = run_level(server, 16, 64, a.soak_tokens)
                rss_warm = server.rss()
                r = run_level(server, 16, a.soak, a.soak_tokens)
                rss_end = server.rss()
                r.update(kind="soak", rss_start_mib=rss0 / 2**20, rss_warm_mib=rss_warm / 2**20,
                         rss_end_mib=rss_end / 2**20, rss_growth=rss_end / rss_warm - 1, warmup_errors=warm["errors"])
                records.append(r)
                print(fmt_row(r) + f"  rss start {rss0 / 2**20:.0f} / after warm-up {rss_warm / 2**20:.0f} / end "
                      f"{rss_end / 2**20:.0f} MiB ({r['rss_growth']:+.1%})", flush=True)
        finally:
            server.stop()
    by = {(r["server"], r["concurrency"]): r["tokens_per_s"] for r in records if "kind" not in r}
    for c in levels:
        if ("st-sdk", c) in by and ("st-sdk", 1) in by:
            line = f"# st-sdk C={c}: {by['st-sdk', c] / by['st-sdk', 1]:.2f}x its one stream"
            if ("llama-cpp", c) in by:
                line += f", {by['st-sdk', c] / by['llama-cpp', c]:.2f}x llama-cpp-python's server at C={c}"
            print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
