"""Running a comparison: every case in its own worker, interleaved round by round (A, B, A, B ...) so
that noise from a shared machine hits all of them alike; medians, spreads and paired ratios."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from ..errors import InputError
from ..hardware import resolve_threads
from ..registry import get_registry
from ..timing import summary
from .files import synth_gguf
from .machine import machine_info, read_bandwidth
from .traffic import gguf_format
from .worker import LLAMA, Worker

DEFAULT_FORMATS = ("q4_0", "q8_0", "f16")


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
    sparsity: dict[str, Any] | None = None   # Backend.sparsity over decode steps of random tokens
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

    threads = resolve_threads(opts.threads, "--threads")
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
        for fmt, path in plan:
            records += run(fmt, path, backends)
            records += [Record(name, fmt, status="skipped", reason=f"plugin failed to load: {err}", threads=threads)
                        for name, err in broken.items()]
    context = {"config": {"model": opts.model or f"synthetic {opts.preset} (seed {opts.seed})",
                          "preset": None if opts.model else opts.preset, "threads": threads,
                          "prompt_len": opts.prompt_len, "gen_len": opts.gen_len, "rounds": opts.rounds,
                          "warmup_rounds": opts.warmup, "interleaved": True,
                          "memory_mode": f"max_memory={opts.max_memory}" if opts.max_memory else "resident"},
               "machine": machine_info(bandwidth)}
    return records, context


def _plan(opts: BenchOptions) -> list[tuple[str, str]]:
    """[(format, model file)] to run: the given file, or a synthetic GGUF per format."""
    if opts.model:
        path = Path(opts.model)
        if not path.exists():
            raise InputError(f"model file {opts.model} does not exist")
        return [(gguf_format(path) if path.suffix == ".gguf" else "file", str(path))]
    return [(fmt, str(synth_gguf(opts.preset, fmt, opts.seed))) for fmt in opts.formats]


class _FormatRun:
    """All cases of one weight format: st-sdk backends in groups of `group` live workers, llama.cpp
    alive throughout; every round runs each live worker once, starting from a rotating position."""

    def __init__(self, opts: BenchOptions, threads: int, bandwidth: float, env: dict[str, str], group: int):
        self.opts, self.threads, self.bandwidth, self.env, self.group = opts, threads, bandwidth, env, group
        self.bar = None

    def __call__(self, fmt: str, path: str, backends: list[str]) -> list[Record]:
        o = self.opts
        common = dict(model=path, preset=o.preset, fmt=fmt, seed=o.seed, threads=self.threads,
                      n_ctx=o.prompt_len + o.gen_len + o.warmup + 16)
        peer, peer_why = None, None
        if o.vs_llama_cpp:
            peer_why = llama_cpp_missing() or (
                None if path.endswith(".gguf") else f"llama.cpp reads .gguf files, not {path}")
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
        rec.sparsity = w.ask(op="sparsity").get("sparsity") if w.spec["kind"] != LLAMA else None
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
