"""st-sdk's C backend against llama.cpp on one GGUF file, in CPU time as well as wall time.

    python benchmarks/cpu_vs_llama.py MODEL.gguf [--threads 1] [--rounds 5] [--prompt-len 128] [--gen-len 16]

On a shared machine wall-clock time mostly measures the other jobs; the CPU time a process spends
(`time.process_time`, all its threads) is the steadier comparison, and with one thread it is the
whole cost. Each engine runs in its own child process (st_sdk.bench's loader, so the same settings as
`st-sdk bench`), loaded once; the parent interleaves them round by round (A B, then B A, ...) after
one warm-up round each, and prints medians and the median of the per-round ratios llama.cpp / st-sdk
(> 1: st-sdk is faster) for a prefill of --prompt-len tokens and for --gen-len decode steps (fed the
same random tokens on both engines), with the weight bytes a dense decode step reads and the fraction
of the measured read bandwidth (one probe per run, one thread, in CPU time) those bytes at the decode CPU
time amount to, and st-sdk's live-neuron fraction and expert bytes actually read (Backend.sparsity). The
dense limit is printed too: after each round, the rate st-sdk's dense kernels stream the output head
from memory (with a read of twice the last-level cache before each call, so the caches do not hold
it) and st_sdk.bench.read_bandwidth at the run's threads, each against the dense bytes per token at
that round's decode rate (above 100%: past the dense limit, which only skipping bytes can do), and on
the C backend where its decode step's time goes, stage by
stage (Backend.stage_seconds), with each weight stage's dense bytes and the rate they imply, and for
the expert stages, where the sparse layouts skip dead neurons' bytes, the bytes read and their rate,
and how long its threads waited for one another (CBackend.wait_seconds). The load average before and
after is printed too. Environment variables reach the st-sdk child (ST_C_SPARSE=0,
ST_C_SPARSE_LAYOUT=up+down: docs/c_backend.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median


def child(spec: dict) -> None:
    """Load one engine, then answer 'round' lines with wall and CPU seconds of prefill and decode."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import numpy as np

    from st_sdk.bench.worker import load_case as _load_case
    from st_sdk.timing import decode_sparsity, prompt_ids

    runner, facts = _load_case(spec)
    proto.write(json.dumps({"ready": True, "facts": {k: str(v) for k, v in facts.items()}}) + "\n")
    proto.flush()
    ids = prompt_ids(runner, spec["prompt_len"])
    # decode steps are fed random tokens, the same for both engines: greedy steps on random weights loop
    # over a few tokens, whose experts then stay in the CPU's last-level cache
    steps = np.random.default_rng(1).integers(0, runner.vocab_size, spec["gen_len"])
    for line in sys.stdin:
        if line.strip() == "sparsity":
            proto.write(json.dumps({"sparsity": decode_sparsity(runner, spec["gen_len"])}) + "\n")
            proto.flush()
            continue
        if line.strip() == "stream":
            proto.write(json.dumps({"stream": head_stream(runner)}) + "\n")
            proto.flush()
            continue
        if line.strip() == "stage_bytes":
            proto.write(json.dumps({"stage_bytes": stage_bytes(runner)}) + "\n")
            proto.flush()
            continue
        if line.strip() != "round":
            break
        w0, c0 = time.perf_counter(), time.process_time()
        tok = runner.prefill(ids)
        stages = getattr(getattr(getattr(runner, "model", None), "backend", None), "stage_seconds", None)
        if stages:
            stages(reset=True)
        w1, c1 = time.perf_counter(), time.process_time()
        for t in steps:
            tok = runner.step(int(t))
        w2, c2 = time.perf_counter(), time.process_time()
        per = {k: v / spec["gen_len"] for k, v in stages().items()} if stages else None
        waited = getattr(runner.model.backend, "wait_seconds", lambda: None)() if stages else None   # reset with them
        proto.write(json.dumps({"prefill_wall": w1 - w0, "prefill_cpu": c1 - c0,
                                "decode_wall": (w2 - w1) / spec["gen_len"], "decode_stages": per,
                                "decode_waited": waited / spec["gen_len"] if waited is not None else None,
                                "decode_cpu": (c2 - c1) / spec["gen_len"], "token": int(np.int64(tok))}) + "\n")
        proto.flush()


_FLUSH: list = []   # the child's flush array, made once


def head_stream(runner, repeats: int = 7) -> dict | None:
    """The rate st-sdk's own dense kernels stream weights from memory: the output head (the model's
    largest matrix) applied to one row, wall time at the run's threads, median of `repeats` calls, each
    after an array of st_sdk.bench.memory_probe_mib() MiB (twice the last-level cache) was read, so the
    head comes from memory as it does in a decode step, where the other weights pass through the caches
    between two reads of it. Also the median of as many calls back to back, after three warm-up calls,
    which a last-level cache that holds a good part of the head flatters (docs/c_backend.md).
    Dense bytes per token times tokens per second above the first is a decode past the dense limit.
    None for llama.cpp."""
    import numpy as np

    from st_sdk.bench.machine import memory_probe_mib

    model = getattr(runner, "model", None)
    if model is None:
        return None
    head = model.params.head
    x = np.random.default_rng(0).standard_normal((1, model.config.hidden_size)).astype(np.float32)
    if not _FLUSH:
        _FLUSH.append(np.ones(memory_probe_mib() * 2**20 // 8, np.uint64))
    flush = _FLUSH[0]

    def timed() -> float:
        t0 = time.perf_counter()
        model.ops.linear(x, head)
        return time.perf_counter() - t0

    for _ in range(3):
        timed()
    warm = [timed() for _ in range(repeats)]
    cold = []
    for _ in range(repeats):
        np.count_nonzero(flush)
        cold.append(timed())
    return {"bytes": int(head.raw.nbytes), "bytes_per_s": head.raw.nbytes / median(cold),
            "warm_bytes_per_s": head.raw.nbytes / median(warm), "flush_mib": flush.nbytes // 2**20}


def stage_bytes(runner) -> dict | None:
    """The weight bytes a dense decode step reads in each stage of the C backend's fused pass
    (Backend.stage_seconds' names), from st_sdk.sizes.weight_bytes_per_token: q, k, v and router; the
    output projection; the picked experts' gate and up, and their down; the head. None for llama.cpp."""
    from st_sdk.sizes import weight_bytes_per_token

    model = getattr(runner, "model", None)
    if model is None:
        return None
    w = weight_bytes_per_token(model.params, model.config)
    return {"qkv_router": w["wq"] + w["wk"] + w["wv"] + w["router"], "attn_out": w["wo"],
            "gate_up": w["gate"] + w["up"], "down": w["down"], "head": w["head"]}


def stage_read_bytes(weights: dict | None, sparsity: dict | None) -> dict:
    """The bytes the expert stages read per decode step where sparse ReGLU's layouts skip some (the
    counters of Backend.sparsity: down's own, the rest gate and up), so their rate is the one their
    memory traffic ran at; {} where nothing was skipped or nothing was counted."""
    if not weights or not sparsity or "down_bytes_per_token" not in sparsity \
            or sparsity["expert_bytes_per_token"] >= sparsity["dense_expert_bytes_per_token"]:
        return {}
    down = sparsity["down_bytes_per_token"]
    return {"gate_up": sparsity["expert_bytes_per_token"] - down, "down": down}


def cpu_bandwidth(repeats: int = 7) -> float:
    """Read bandwidth in bytes per second of CPU time: one thread summing a uint64 array of
    st_sdk.bench.machine.memory_probe_mib() MiB (median of `repeats`), the same clock as the figures it
    is compared with."""
    import numpy as np

    from st_sdk.bench.machine import memory_probe_mib

    a = np.ones(memory_probe_mib() * 2**20 // 8, np.uint64)
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        a.sum()
        times.append(time.process_time() - c0)
    return a.nbytes / median(times)


def dense_limit(nbytes: int, walls: list[float], probes: list[dict], threads: int) -> None:
    """Print the dense bytes per token at st-sdk's decode rate against the two yardsticks measured
    after each round: the rate st-sdk's dense kernels stream the head from memory (head_stream) and
    st_sdk.bench.read_bandwidth at the run's threads; medians of the per-round ratios (above 100%: past
    the dense limit, which only skipping bytes can do)."""
    streams = [p["stream"] for p in probes if p.get("stream")]
    if len(streams) != len(walls):
        return
    rates = [nbytes / w for w in walls]
    cold = [r / s["bytes_per_s"] for r, s in zip(rates, streams)]
    read = [r / p["read"] for r, p in zip(rates, probes)]
    s0 = streams[0]
    print(f"the dense bytes per token at st-sdk's decode rate: {median(rates) / 1e9:.1f} GB/s; after each round, "
          f"st-sdk's dense kernels streamed the head ({s0['bytes'] / 1e6:.1f} MB, one row, wall) from memory at "
          f"{median(s['bytes_per_s'] for s in streams) / 1e9:.1f} GB/s ({s0['flush_mib']} MiB read before each "
          f"call; {median(s['warm_bytes_per_s'] for s in streams) / 1e9:.1f} GB/s called back to back, partly "
          f"from the caches) and read_bandwidth({threads}) gave {median(p['read'] for p in probes) / 1e9:.1f} GB/s")
    print(f"  decode against the dense limit, median of the rounds (range): {median(cold):.0%} "
          f"({min(cold):.0%}-{max(cold):.0%}) of the head's stream, {median(read):.0%} ({min(read):.0%}-"
          f"{max(read):.0%}) of read_bandwidth")


class Child:
    def __init__(self, spec: dict, env: dict[str, str] | None = None):   # env: the child's, else this one's
        self.p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        self.ready = json.loads(self.p.stdout.readline())

    def ask(self, what: str) -> dict:
        self.p.stdin.write(what + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def round(self) -> dict:
        return self.ask("round")

    def close(self) -> None:
        self.p.stdin.write("stop\n")
        self.p.stdin.close()
        self.p.wait(timeout=60)


def main() -> None:
    from st_sdk.bench import read_bandwidth

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--backend", default="c")
    a = ap.parse_args()
    from st_sdk.bench import LLAMA, gguf_bytes_per_token, gguf_format

    load0 = open("/proc/loadavg").read().split()[:3]
    common = {"model": a.model, "threads": a.threads, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
              "n_ctx": a.prompt_len + a.gen_len + 16}
    ours = Child({**common, "kind": "st-sdk", "backend": a.backend})
    theirs = Child({**common, "kind": LLAMA})
    nbytes = gguf_bytes_per_token(a.model)
    print(f"file {a.model} ({gguf_format(a.model)} dominant), threads {a.threads}, prompt {a.prompt_len}, "
          f"decode {a.gen_len} tokens x {a.rounds} rounds (+1 warm-up), backend {a.backend}")
    print(f"st-sdk: {ours.ready['facts'].get('variant')}")
    print(f"llama.cpp: {theirs.ready['facts'].get('variant')}")
    res: dict[str, list[dict]] = {"st-sdk": [], "llama.cpp": []}
    ours.round(), theirs.round()   # warm-up: page in the weights, settle the caches
    probes: list[dict] = []   # after each round: the dense limit's two yardsticks (dense_limit)
    for r in range(a.rounds):
        pair = [("st-sdk", ours), ("llama.cpp", theirs)]
        for name, c in (pair if r % 2 == 0 else pair[::-1]):
            res[name].append(c.round())
        probes.append({"stream": ours.ask("stream").get("stream"), "read": read_bandwidth(a.threads)})
    sparsity = ours.ask("sparsity").get("sparsity")
    weights = ours.ask("stage_bytes").get("stage_bytes")
    ours.close(), theirs.close()
    bw = cpu_bandwidth()
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"weights read per decoded token {nbytes / 1e6:.1f} MB; read bandwidth {bw / 1e9:.1f} GB/s of CPU time "
          f"(one thread); load average {' '.join(load0)} before, {' '.join(load1)} after")
    print(f"{'':18s} {'st-sdk':>10s} {'llama.cpp':>10s} {'ratio':>7s}   of bandwidth (st-sdk / llama.cpp)")
    for key, unit, scale in (("prefill_cpu", "s", 1), ("prefill_wall", "s", 1), ("decode_cpu", "ms/token", 1e3),
                             ("decode_wall", "ms/token", 1e3)):
        o = [x[key] for x in res["st-sdk"]]
        t = [x[key] for x in res["llama.cpp"]]
        ratio = median(tt / oo for oo, tt in zip(o, t))
        frac = ""
        if key == "decode_cpu":
            frac = f"   {nbytes / median(o) / bw:.0%} / {nbytes / median(t) / bw:.0%}"
        print(f"{key + ' (' + unit + ')':18s} {median(o) * scale:10.2f} {median(t) * scale:10.2f} {ratio:6.2f}x{frac}")
    dense_limit(nbytes, [x["decode_wall"] for x in res["st-sdk"]], probes, a.threads)
    stages = [x["decode_stages"] for x in res["st-sdk"] if x.get("decode_stages")]
    if stages:
        wall = median(x["decode_wall"] for x in res["st-sdk"])
        print(f"where st-sdk's decode step goes (the fused pass's stages, medians over rounds; the barriers "
              f"waiting for the other threads included; the rest of the {wall * 1e3:.2f} ms is outside the pass):")
        read = stage_read_bytes(weights, sparsity)
        for name in stages[0]:
            t = median(x[name] for x in stages)
            b = (weights or {}).get(name)
            rate = f"   {b / 1e6:7.1f} MB dense  {b / t / 1e9:5.1f} GB/s" if b and t > 0 else ""
            if name in read and t > 0:
                rate += f"   {read[name] / 1e6:7.1f} MB read  {read[name] / t / 1e9:5.1f} GB/s"
            print(f"  {name:12s} {t * 1e3:7.3f} ms {t / wall:6.1%}{rate}")
        waits = [x["decode_waited"] for x in res["st-sdk"] if x.get("decode_waited") is not None]
        if waits:
            print(f"  the threads waited for one another {median(waits) * 1e3:.3f} ms a token, summed over them "
                  f"(at the stages' barriers and the end of each call)")
    if sparsity:
        print(f"st-sdk sparse ReGLU over {sparsity['tokens']} decode steps: {sparsity['live_fraction']:.1%} of expert "
              f"neurons live; expert weights read {sparsity['expert_bytes_per_token'] / 1e6:.1f} MB per token of "
              f"{sparsity['dense_expert_bytes_per_token'] / 1e6:.1f} dense")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(json.loads(sys.argv[sys.argv.index("--child") + 1]))
    else:
        main()
