"""Benchmarks across backends and weight formats, with llama.cpp as the peer.

Every case (one backend and one weight format, or llama.cpp on the same GGUF file) runs in its own
child process, so its peak RSS is measured (`ru_maxrss`), not estimated, and a crashing backend
cannot take the run down. The parent interleaves the cases round by round (A, B, A, B ...) so that
noise from a shared machine hits all of them alike, and reports medians, spreads and paired ratios.
Timing itself is `st_sdk.timing.time_round`, the harness the selection code and benchmarks/ use too.

Decode is memory-bound: each token reads the dense weights, k of E experts per layer and the LM
head. Those bytes over this machine's measured read bandwidth give a decode ceiling, and every decode
figure is also shown as a fraction of it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Iterable

import numpy as np

from .errors import InputError

log = logging.getLogger("st_sdk")

DEFAULT_FORMATS = ("q4_0", "q8_0", "f16")
LLAMA = "llama.cpp"


# ---- machine ---------------------------------------------------------------------------------
def clamp_threads(n: int | None) -> int:
    from .hardware import probe

    hw = probe()
    if not n:
        return hw.physical_cores
    if n > hw.logical_cores:
        log.warning("--threads %d is more than the %d cores this process may use; using %d",
                    n, hw.logical_cores, hw.logical_cores)
        return hw.logical_cores
    return n


def library_versions() -> dict[str, str | None]:
    """Versions of what decides speed, read from package metadata (imports nothing heavy)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("st-sdk", "numpy", "torch", "jax", "jaxlib", "cffi", "llama-cpp-python", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def machine_info(bandwidth: float | None = None) -> dict[str, Any]:
    from .hardware import probe

    hw = probe()
    info = {"cpu": hw.cpu_model, "arch": hw.machine, "system": hw.system, "flags": sorted(hw.features),
            "physical_cores": hw.physical_cores, "logical_cores": hw.logical_cores,
            "ram_gib": round(hw.ram_bytes / 2**30, 1) if hw.ram_bytes else None,
            "versions": library_versions()}
    if bandwidth:
        info["read_bandwidth_gbs"] = round(bandwidth / 1e9, 2)
    return info


def read_bandwidth(threads: int = 1, mib: int = 512, repeats: int = 7) -> float:
    """Measured memory read bandwidth in bytes/s: `threads` threads each scanning their slice of an
    array far larger than the caches (numpy releases the GIL); median of `repeats`. The scan is
    `count_nonzero` over 64-bit words, the cheapest SIMD loop numpy has (a float sum is compute-bound
    near 12 GB/s per core): still a plain stream, so tuned kernels can beat it by a little."""
    n = mib * 2**20 // 8
    a = np.ones(n, np.uint64)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [a[bounds[i]:bounds[i + 1]] for i in range(threads)]

    def run():
        if threads == 1:
            np.count_nonzero(slices[0])
            return
        ts = [threading.Thread(target=np.count_nonzero, args=(s,)) for s in slices]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    run()   # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return a.nbytes / median(times)


# ---- bytes a decoded token reads --------------------------------------------------------------
def bytes_per_token(params, cfg) -> int:
    """Weight bytes one decode step reads: dense parts of every layer, k of E experts, the final norm,
    one embedding row and the head."""
    k, E = cfg.moe_num_active_primary_experts, cfg.moe_num_primary_experts
    total = params.embed.raw.nbytes // cfg.vocab_size + params.norm.raw.nbytes + params.head.raw.nbytes
    for lp in params.layers:
        total += sum(getattr(lp, f).raw.nbytes for f in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "router"))
        total += sum(getattr(lp, f).raw.nbytes for f in ("gate", "up", "down")) * k // E
    return int(total)


def gguf_bytes_per_token(path: str | os.PathLike) -> int:
    """The same count for a model file, read through st-sdk's own (fast) reader without a backend."""
    from .weights import open_model

    f = open_model(path)
    return bytes_per_token(f.params(), f.config)


def gguf_format(path: str | os.PathLike) -> str:
    """The dominant weight type of a model file (by bytes), as an st-sdk format name."""
    from .loader import weight_format
    from .weights import open_model

    return weight_format(open_model(path).params())


# ---- model files ------------------------------------------------------------------------------
def cache_dir() -> Path:
    d = os.environ.get("ST_SDK_CACHE_DIR")
    if not d:
        import platformdirs

        d = platformdirs.user_cache_dir("st-sdk")
    return Path(d) / "models"


def synth_gguf(preset: str, fmt: str, seed: int = 0) -> Path | None:
    """A synthetic GGUF of `preset` in `fmt`, written once into the cache directory and reused
    (written under a temporary name, then renamed, so concurrent runs never see half a file).
    None when this st-sdk cannot write model files yet."""
    from . import synth

    if not hasattr(synth, "write_model"):
        return None
    target = cache_dir() / f"{preset}-{fmt}-seed{seed}.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):   # a second writer waits, then reuses
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".writing-") as tmp:
            log.warning("synthesising %s %s into %s (once)", preset, fmt, target)
            out = synth.write_model(tmp, preset=preset, formats=("gguf",), dtype=fmt, seed=seed)
            os.replace(_find_gguf(out, tmp), target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:   # Windows: no lock; the rename still keeps half-written files invisible
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_gguf(out, folder) -> Path:
    if isinstance(out, dict) and out.get("gguf"):   # write_model returns {"gguf": path, ...}
        return Path(out["gguf"])
    found = sorted(Path(folder).rglob("*.gguf"))
    if not found:
        raise InputError(f"synth.write_model wrote no .gguf file into {folder}")
    return found[0]


# ---- the child process ------------------------------------------------------------------------
def _peak_rss() -> int:
    """This process's peak resident set in bytes. On Linux from VmHWM, which exec resets:
    ru_maxrss would carry over the parent's peak into the child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024
    except ImportError:   # Windows
        import psutil

        return int(psutil.Process().memory_info().peak_wset)


def _load_case(spec: dict):
    """(runner, facts) for one case, inside the child."""
    from .timing import LlamaRunner, ModelRunner

    threads = spec["threads"]
    if spec["kind"] == LLAMA:
        from llama_cpp import Llama

        llm = Llama(model_path=spec["model"], n_threads=threads, n_threads_batch=threads,
                    n_ctx=spec["n_ctx"], n_batch=512, logits_all=False, verbose=False)
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()   # "CPU : SSE3 = 1 | AVX = 1 | ..."
        features = [kv.split("=")[0].split(":")[-1].strip() for kv in info.split("|") if kv.strip().endswith("= 1")]
        facts = {"variant": f"llama-cpp-python {llama_cpp.__version__}, {' '.join(features)}", "source": "gguf file"}
        if spec.get("model"):
            facts["bytes_per_token"] = gguf_bytes_per_token(spec["model"])
        return LlamaRunner(llm), facts
    if spec.get("model") and spec.get("use_file", True):
        import st_sdk

        extra = {"max_memory": spec["max_memory"]} if spec.get("max_memory") else {}
        model = st_sdk.load(spec["model"], backend=spec["backend"], n_threads=threads, **extra)
        source = "gguf file" if str(spec["model"]).endswith(".gguf") else "file"
    else:
        if spec.get("max_memory"):
            raise InputError("--max-memory needs weights in a model file (experts are read from it)")
        from . import synth

        model = synth.build_model(spec["preset"], seed=spec["seed"], fmt=spec["fmt"], backend=spec["backend"],
                                  n_threads=threads)
        source = "in-memory synthetic"
    facts = {"variant": ", ".join(f"{k}={v}" for k, v in model.backend.describe().items()),
             "fallbacks": list(model.ops.fallbacks),
             "bytes_per_token": bytes_per_token(model.params, model.config), "source": source}
    if source != "in-memory synthetic":
        from .loader import weight_format

        facts["format"] = weight_format(model.params)
    return ModelRunner(model), facts


def worker_main() -> int:
    """`python -m st_sdk.bench --worker SPEC`: load one case, then answer requests on stdin, one JSON
    line each, on the real stdout (libraries that print are sent to stderr)."""
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**msg):
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    from .errors import BackendError
    from .timing import Timing, time_round

    base = _peak_rss()
    t0 = time.perf_counter()
    try:
        runner, facts = _load_case(spec)
    except (BackendError, ImportError, InputError) as e:
        reply(skip=f"{type(e).__name__}: {e}")
        return 0
    except Exception as e:
        reply(error=f"{type(e).__name__}: {e}")
        return 1
    reply(ready=True, load_s=time.perf_counter() - t0, baseline_rss=base, **facts)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "round":
            t = time_round(runner, req["prompt_len"], req["gen_len"], warmup=req.get("warmup", 1), timing=Timing())
            reply(prefill_s=t.prefill_s[0], decode_s=t.decode_s)
        elif req["op"] == "rss":
            model = getattr(runner, "model", None)
            offload = getattr(model, "offload", None)
            reply(peak_rss=_peak_rss(), offload=offload.stats.as_dict() if offload is not None else None,
                  memory_plan=model.memory_plan.describe() if offload is not None else None)
        else:
            break
    return 0


class Worker:
    """The parent's handle on one child process running one case."""

    def __init__(self, spec: dict, env: dict[str, str] | None = None):
        self.spec = spec
        self.label = spec["backend"] if spec["kind"] != LLAMA else LLAMA
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "st_sdk.bench", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, env=env)
        self.hello = self._recv()

    def _recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            tail = self.err.read().decode(errors="replace").strip().splitlines()[-5:]
            return {"error": f"worker exited with code {self.proc.returncode}: " + " | ".join(tail)}
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


# ---- running a comparison ---------------------------------------------------------------------
@dataclass
class Record:
    backend: str
    format: str
    status: str = "ok"                    # ok | skipped | failed
    reason: str | None = None
    threads: int = 0
    model: str = ""
    source: str = ""
    variant: str = ""
    fallbacks: list[str] = field(default_factory=list)
    prompt_len: int = 0
    gen_len: int = 0
    rounds: int = 0
    prefill_tps: float | None = None
    prefill_spread: float | None = None
    decode_tps: float | None = None
    decode_spread: float | None = None
    peak_rss_mib: float | None = None
    load_s: float | None = None
    bytes_per_token: int | None = None
    decode_limit_tps: float | None = None
    limit_fraction: float | None = None
    vs_llama_cpp_decode: float | None = None
    vs_llama_cpp_prefill: float | None = None
    offload: dict[str, Any] | None = None   # expert-cache statistics under --max-memory
    memory_plan: str | None = None
    prefill_runs: list[float] = field(default_factory=list, repr=False)   # tokens/s per round
    decode_runs: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchOptions:
    backends: list[str] | None = None       # None: every registered backend
    model: str | None = None                # a model file; None: synthesise `preset`
    preset: str = "tiny"
    formats: tuple[str, ...] = DEFAULT_FORMATS
    prompt_len: int = 128
    gen_len: int = 32
    rounds: int = 3
    warmup: int = 1
    threads: int | None = None
    vs_llama_cpp: bool = False
    max_workers: int = 0                    # cases of one format alive at once (0: all; 1 for big models)
    seed: int = 0
    max_memory: str | None = None           # memory-budget mode for st-sdk backends ("1GiB")


def registered_backends() -> tuple[list[str], dict[str, str]]:
    """Backends registered through the entry points, and {plugin: error} for plugins that failed to load."""
    from .registry import get_registry

    reg = get_registry()
    names = list(reg.backends())
    broken = {p.name: p.error for p in reg.plugins if p.error and p.name not in names}
    return names, broken


def llama_cpp_missing() -> str | None:
    from importlib.util import find_spec

    return None if find_spec("llama_cpp") else "llama-cpp-python is not installed (pip install llama-cpp-python)"


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)   # BLAS pools of numpy/torch obey these, not our n_threads
    return env


def run_bench(opts: BenchOptions, progress: bool = True) -> tuple[list[Record], dict[str, Any]]:
    """Run every case; returns (records, context: configuration, machine, bandwidth)."""
    from tqdm import tqdm

    threads = clamp_threads(opts.threads)
    broken: dict[str, str] = {}
    if opts.backends:
        backends = list(opts.backends)
    else:
        backends, broken = registered_backends()
    bandwidth = read_bandwidth(threads)
    plan = _plan(opts)
    # backends that convert weights at load hold a private copy each: with big models, one at a time
    big = (opts.model and Path(opts.model).is_file() and Path(opts.model).stat().st_size > 2**30) or \
        (not opts.model and opts.preset != "tiny")
    group = opts.max_workers or (1 if big else len(backends))
    run = _FormatRun(opts, threads, bandwidth, _child_env(threads), group)
    total = len(plan) * (len(backends) + opts.vs_llama_cpp) * (opts.rounds + opts.warmup)
    records: list[Record] = []
    with tqdm(total=total, desc="st-sdk bench", unit="run", file=sys.stderr, disable=not progress or None) as bar:
        run.bar = bar
        for fmt, path, use_file in plan:
            records += run(fmt, path, use_file, backends)
            records += [Record(name, fmt, status="skipped", reason=f"plugin failed to load: {err}", threads=threads)
                        for name, err in broken.items()]
    context = {"config": {"model": opts.model or f"synthetic {opts.preset} (seed {opts.seed})",
                          "preset": None if opts.model else opts.preset, "threads": threads,
                          "prompt_len": opts.prompt_len, "gen_len": opts.gen_len, "rounds": opts.rounds,
                          "warmup_rounds": opts.warmup, "interleaved": True,
                          "memory_mode": f"max_memory={opts.max_memory}" if opts.max_memory else "resident"},
               "machine": machine_info(bandwidth)}
    return records, context


def _plan(opts: BenchOptions) -> list[tuple[str, str | None, bool]]:
    """[(format, GGUF path or None, whether st-sdk loads that file)] to run."""
    if opts.model:
        path = Path(opts.model)
        if not path.exists():
            raise InputError(f"model file {opts.model} does not exist")
        return [(gguf_format(path) if path.suffix == ".gguf" else "file", str(path), True)]
    plan = []
    for fmt in opts.formats:
        gguf = synth_gguf(opts.preset, fmt, opts.seed)
        # without a loader ours runs the same synthetic weights in memory
        plan.append((fmt, str(gguf) if gguf else None, bool(gguf and _has_loader())))
    return plan


class _FormatRun:
    """All cases of one weight format: st-sdk backends in groups of `group` live workers, llama.cpp
    alive throughout; every round runs each live worker once, starting from a rotating position."""

    def __init__(self, opts: BenchOptions, threads: int, bandwidth: float, env: dict[str, str], group: int):
        self.opts, self.threads, self.bandwidth, self.env, self.group = opts, threads, bandwidth, env, group
        self.bar = None

    def __call__(self, fmt: str, path: str | None, use_file: bool, backends: list[str]) -> list[Record]:
        o = self.opts
        common = dict(model=path, use_file=use_file, preset=o.preset, fmt=fmt, seed=o.seed, threads=self.threads,
                      n_ctx=o.prompt_len + o.gen_len + o.warmup + 16)
        peer, peer_why = None, None
        if o.vs_llama_cpp:
            peer_why = llama_cpp_missing() or (
                None if path and path.endswith(".gguf") else
                f"llama.cpp reads .gguf files, not {path}" if path else
                "no GGUF file to give llama.cpp (st_sdk.synth.write_model is missing)")
            if not peer_why:
                self.bar.set_postfix_str(f"{fmt} loading {LLAMA}")
                peer = Worker(dict(common, kind=LLAMA, backend=LLAMA), self.env)
        records, peer_runs = [], []
        try:
            for g in range(0, len(backends), self.group):
                group = []
                for name in backends[g:g + self.group]:
                    self.bar.set_postfix_str(f"{fmt} loading {name}")
                    group.append(Worker(dict(common, kind="st", backend=name, max_memory=o.max_memory), self.env))
                results = self._rounds(fmt, group + ([peer] if peer else []))
                theirs = results.get(id(peer), []) if peer else []
                peer_runs += theirs
                for w in group:
                    rec = self._record(w, results.get(id(w), []), fmt)
                    if theirs and rec.status == "ok":
                        rec.vs_llama_cpp_decode = _paired_ratio(rec.decode_runs, [_decode_tps(x) for x in theirs])
                        rec.vs_llama_cpp_prefill = _paired_ratio(rec.prefill_runs,
                                                                 [o.prompt_len / x["prefill_s"] for x in theirs])
                    records.append(rec)
                    w.close()
            if peer is not None:
                rec = self._record(peer, peer_runs, fmt)
                if rec.bytes_per_token is None and any(r.bytes_per_token for r in records):
                    _set_limit(rec, next(r.bytes_per_token for r in records if r.bytes_per_token), self.bandwidth)
                records.append(rec)
            elif o.vs_llama_cpp:
                records.append(Record(LLAMA, fmt, status="skipped", reason=peer_why, threads=self.threads))
        finally:
            if peer is not None:
                peer.close()
        return records

    def _rounds(self, fmt: str, workers: list[Worker]) -> dict[int, list[dict]]:
        o = self.opts
        live = [w for w in workers if w.hello.get("ready")]
        results: dict[int, list[dict]] = {id(w): [] for w in live}
        for r in range(o.warmup + o.rounds):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for w in order:
                self.bar.set_postfix_str(f"{fmt} {w.label}")
                res = w.ask(op="round", prompt_len=o.prompt_len, warmup=1,
                            gen_len=o.gen_len if r >= o.warmup else min(o.gen_len, 4))
                if "error" in res:
                    w.hello = {"error": res["error"]}
                elif r >= o.warmup:
                    results[id(w)].append(res)
            live = [w for w in live if w.hello.get("ready")]
            self.bar.update(len(workers))
        return results

    def _record(self, w: Worker, runs: list[dict], fmt: str) -> Record:
        from .timing import summary

        o = self.opts
        rec = Record(w.label, fmt, threads=self.threads, model=w.spec.get("model") or f"synthetic {o.preset}",
                     prompt_len=o.prompt_len, gen_len=o.gen_len)
        h = w.hello
        if "skip" in h or "error" in h:
            rec.status = "skipped" if "skip" in h else "failed"
            rec.reason = h.get("skip") or h.get("error")
            return rec
        mem = w.ask(op="rss")
        rec.peak_rss_mib = mem.get("peak_rss", 0) / 2**20 or None
        rec.offload, rec.memory_plan = mem.get("offload"), mem.get("memory_plan")
        rec.source, rec.variant, rec.fallbacks, rec.load_s = (h.get("source", ""), h.get("variant", ""),
                                                              h.get("fallbacks", []), h.get("load_s"))
        if fmt == "file":   # an HF directory: the loader knows its weight format
            rec.format = h.get("format", fmt)
        rec.rounds = len(runs)
        rec.prefill_runs = [o.prompt_len / x["prefill_s"] for x in runs]
        rec.decode_runs = [_decode_tps(x) for x in runs]
        per_token = [s for x in runs for s in x["decode_s"]]
        if runs:
            rec.prefill_tps = median(rec.prefill_runs)
            rec.prefill_spread = summary(rec.prefill_runs)["spread"]
            rec.decode_tps = 1.0 / median(per_token) if per_token else None   # as Timing.decode_tps
            rec.decode_spread = summary(rec.decode_runs)["spread"]
        if h.get("bytes_per_token"):
            _set_limit(rec, h["bytes_per_token"], self.bandwidth)
        return rec


def _has_loader() -> bool:
    from importlib.util import find_spec

    return find_spec("st_sdk.loader") is not None


def _decode_tps(res: dict) -> float:
    return len(res["decode_s"]) / sum(res["decode_s"]) if res["decode_s"] else float("nan")


def _paired_ratio(ours: list[float], theirs: list[float]) -> float | None:
    """Median over rounds of ours/theirs, pairing each round with the peer's run next to it."""
    pairs = [a / b for a, b in zip(ours, theirs) if b]
    return median(pairs) if pairs else None


def _set_limit(rec: Record, nbytes: int, bandwidth: float) -> None:
    rec.bytes_per_token = nbytes
    rec.decode_limit_tps = bandwidth / nbytes
    if rec.decode_tps:
        rec.limit_fraction = rec.decode_tps / rec.decode_limit_tps


# ---- reports ----------------------------------------------------------------------------------
def _fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def format_table(records: list[Record], context: dict[str, Any]) -> str:
    c, m = context["config"], context["machine"]
    lines = [f"model: {c['model']}   threads: {c['threads']}   prompt: {c['prompt_len']} tokens   "
             f"decode: {c['gen_len']} tokens   rounds: {c['rounds']} (+{c['warmup_rounds']} warm-up), "
             f"interleaved   memory: {c['memory_mode']}",
             f"machine: {m['cpu']} ({m['arch']}, {m['physical_cores']} cores / {m['logical_cores']} threads, "
             f"{m['ram_gib']} GiB; {' '.join(m['flags'])})   read bandwidth: {m.get('read_bandwidth_gbs', '?')} GB/s",
             ""]
    head = ["backend", "format", "prefill tok/s", "decode tok/s", "peak RSS MiB", "of BW limit",
            "vs llama.cpp (dec / pre)"]
    rows = []
    for r in records:
        if r.status != "ok":
            rows.append([r.backend, r.format, f"{r.status}: {r.reason}", "", "", "", ""])
            continue
        ratio = "-" if r.vs_llama_cpp_decode is None else \
            f"{r.vs_llama_cpp_decode:.2f}x / {_fmt(r.vs_llama_cpp_prefill, '.2f')}x"
        rows.append([r.backend, r.format,
                     f"{_fmt(r.prefill_tps, '.1f')} ±{_fmt(r.prefill_spread and r.prefill_spread * 50, '.0f')}%",
                     f"{_fmt(r.decode_tps, '.2f')} ±{_fmt(r.decode_spread and r.decode_spread * 50, '.0f')}%",
                     _fmt(r.peak_rss_mib, '.0f'),
                     f"{r.limit_fraction * 100:.0f}% of {r.decode_limit_tps:.0f}" if r.limit_fraction else "-",
                     ratio])
    widths = [max(len(str(x[i])) for x in [head] + [r for r in rows if r[3] != "" or i < 2]) for i in range(len(head))]
    for row in [head] + rows:
        if row[3] == "" and row is not head:   # a skipped case: one long reason column
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
        else:
            lines.append("  ".join(f"{str(x):<{w}}" if i < 2 else f"{str(x):>{w}}"   # names left, figures right
                                   for i, (x, w) in enumerate(zip(row, widths))))
    details = {}
    for r in records:   # the whole configuration: kernel variant, dtype, fallbacks per backend
        if r.status == "ok" and r.backend not in details:
            fb = f"; falls back to NumPy for {', '.join(r.fallbacks)}" if r.fallbacks else ""
            details[r.backend] = f"  {r.backend}: {r.variant or '-'}{fb}"
    for r in records:
        if r.offload:
            st = r.offload
            details[f"{r.backend}-{r.format}-offload"] = (
                f"  {r.backend} {r.format} under {c['memory_mode']}: {r.memory_plan}; expert cache hit rate "
                f"{st['hit_rate']:.1%}, read {st['bytes_read'] / 2**20:.0f} MiB, stalled {st['stall_s']:.2f} s")
    lines += ["", "backends:", *details.values(), "",
              "± is half the range over rounds. 'of BW limit' is decode tok/s over (read bandwidth / weight bytes a "
              "token reads with k dense experts); kernels that skip zero ReGLU neurons can exceed 100%. vs llama.cpp "
              "is the median of per-round ratios on the same file (>1: faster than llama.cpp)."]
    return "\n".join(lines)


def to_json(records: Iterable[Record], context: dict[str, Any]) -> str:
    return json.dumps({**context, "records": [r.to_dict() for r in records]}, indent=2)


def plot(records: list[Record], path: str, title: str = "") -> None:
    """Bar chart of prefill and decode tokens/s per backend and format (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError('--plot needs matplotlib: pip install -e ".[plot]" (from a clone of st-sdk)') from None
    ok = [r for r in records if r.status == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    formats = sorted({r.format for r in ok})
    backends = list(dict.fromkeys(r.backend for r in ok))
    width = 0.8 / max(len(backends), 1)
    for ax, key, name in ((axes[0], "prefill_tps", "prefill tokens/s"), (axes[1], "decode_tps", "decode tokens/s")):
        for j, b in enumerate(backends):
            vals = [next((getattr(r, key) or 0 for r in ok if r.backend == b and r.format == f), 0) for f in formats]
            ax.bar(np.arange(len(formats)) + j * width, vals, width, label=b)
        ax.set_xticks(np.arange(len(formats)) + width * (len(backends) - 1) / 2, formats)
        ax.set_title(name)
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.exit(worker_main())
