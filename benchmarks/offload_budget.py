"""Memory-budget mode under a hard memory limit, side by side with llama.cpp on the same file.

Each runner is a child process placed in a memory cgroup (v1 `memory.limit_in_bytes` or v2
`memory.max`) whose limit is the budget, so page cache counts too. Reports decode tokens/s (median),
the cgroup's peak (page cache included, so it sits at the limit once the file has been read) and the
process's own peak RSS, and the expert-cache statistics (hit rate, bytes read, stall time) for st-sdk
with its defaults, with prefetch off (or router-only, or reading every guess ahead), with each
cache policy of --policies, with --convert-run never using a prepared expert file (expert_file=False:
every expert converted to the backend's layout as it is read), and with --resident-run the same tokens
with the whole model in memory (outside the cgroup), each st-sdk row then reported as a share of it.

The st-sdk runs start from an empty st-sdk cache directory (a temporary one, removed at the end), as
on a fresh machine: the defaults' first load chooses the backend and, where the backend converts the
experts it reads, writes the prepared expert file (st_sdk.offload.prepared) inside the limit; later
loads read it. That first load's time is reported on its own. --prepared-run adds a row whose
prepared file is written before the runs, outside the limit, in the usual cache directory (kept).
llama.cpp runs without its repacked weight copy (`--no-repack`), the only way it fits a budget smaller
than the file.

    python benchmarks/offload_budget.py MODEL.gguf --budget 1GiB [--tokens 256] [--repeats 3] [--threads 2]
        [--policies lfru,lru]

st-sdk loads with its defaults (automatic backend choice) unless --backend says otherwise. Every
runner reads the same 8 warm-up and --tokens measured tokens one at a time, teacher-forced: distinct
ids spread over the vocabulary, so routing sees diverse inputs. Reported per configuration: medians over
--repeats runs (page cache dropped before each) of decode tokens/s and per-token latency p50/p99, the
cgroup's peak and the process's peak RSS, runs killed, major page faults per token (mapped pages read
again: dense weights or code evicted at the limit), and the shares of the machine's CPU time over the
measured tokens that a hypervisor took (steal) and that the kernel spent (on a virtual machine, reads
from its virtual disk cost the guest both), and on the C backend the time its threads spent waiting
for one another (a thread the host holds makes the other wait at the next barrier), and each st-sdk
row's expert layouts (the C backend's `sparse_layout`: a row that starts from kept expert use counts
also has the layers' live shares kept with them, and lays the layers out by them); then the
disk-read bound: the bytes st-sdk read per token over the measured random-read bandwidth of the file
it read them from (through the expert cache's own reader when that is a prepared expert file:
`cache_read_bandwidth`).

Needs root (or a delegated cgroup) for the limit; without one it says so and runs unlimited.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

#: the tokens every runner reads, teacher-forced (fed whatever the model predicts): WARMUP of them, then
#: the measured ones; distinct ids spread over the vocabulary, so routing sees diverse inputs (greedy
#: decoding on random weights loops over a few tokens and flatters any cache)
WARMUP = 8
TOKENS_OF = "np.random.default_rng(1234).permutation(np.arange(256, vocab))[:n_all] % vocab"
#: as many other tokens (another permutation), on which --profile-run records the kept use counts
OTHER_TOKENS_OF = TOKENS_OF.replace("1234", "4321")

#: both children's reading of the machine's CPU time over the measured tokens: the share the hypervisor
#: took (steal) and the share spent in the kernel, which a budget run's reads add to
CPU_TICKS = '''
def cpu_ticks():   # the machine's CPU time by kind (/proc/stat): user nice system idle iowait irq softirq steal
    return [int(v) for v in open("/proc/stat").readline().split()[1:9]]
'''
CHILD_OURS = r"""
import json, resource, sys, time, numpy as np, st_sdk
CPU_TICKS
flag = lambda v: {"1": True, "0": False}.get(v, v)
path, budget, n, threads, prefetch, backend, policy, expert_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), flag(sys.argv[5]), sys.argv[6], sys.argv[7], flag(sys.argv[8])
resident = budget == "resident"   # the same tokens with the whole model in memory, no budget
t_load = time.perf_counter()
m = st_sdk.load(path, backend=backend, n_threads=threads, **({} if resident else dict(
    max_memory=budget, prefetch=prefetch, context=512, cache_policy=policy, expert_file=expert_file)))
if n == 0:   # only writing the prepared expert file
    print(json.dumps({"load_s": time.perf_counter() - t_load, "plan": m.memory_plan.describe()})); sys.exit()
t_load = time.perf_counter() - t_load
vocab, n_all = m.config.vocab_size, WARMUP + n
toks = [int(t) for t in TOKENS_OF]
if sys.argv[9:] == ["other"]:   # other tokens than the measured runs' (recording expert use counts)
    toks = [int(t) for t in OTHER_TOKENS_OF]
s = m.session(capacity=n_all + 1)
wait_clock = getattr(m.backend, "wait_seconds", lambda: None)   # the C backend's threads waiting for one another
times = []
for i, tok in enumerate(toks):
    t0 = time.perf_counter(); s.feed([tok]); times.append(time.perf_counter() - t0)
    if i == WARMUP - 1:
        ticks, waited = cpu_ticks(), wait_clock()
        if not resident:
            m.offload.stats.__init__()   # statistics of the measured tokens only
            majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
ticks = [b - a for a, b in zip(ticks, cpu_ticks())]
waited = None if waited is None else wait_clock() - waited
st = None
if not resident:
    st = m.offload.stats.as_dict()
    # page faults that read from disk: the mapped dense weights (or code) evicted at the limit and read again
    st["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - majflt
    st["slots_given_back"] = m.offload.shrunk
    ahead = m.offload.lookahead
    st["ahead_needed_share"] = ahead.share_needed if ahead is not None else None
    st["ahead_active_at_end"] = ahead.active if ahead is not None else None
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
read_from = None if resident or m.memory_plan.expert_file is None else str(m.memory_plan.expert_file)
print(json.dumps({"decode_s": times[WARMUP:], "cpu_ticks": ticks, "waited_s": waited, "stats": st,
                  "plan": None if resident else m.memory_plan.describe(),
                  "expert_file": read_from,
                  "backend": m.backend.name,
                  "layouts": None if resident else m.backend.describe().get("sparse_layout"),
                  "load_s": t_load, "process_peak_rss": hwm,
                  "frameworks": sorted(k for k in ("torch", "jax") if k in sys.modules)}))
""".replace("WARMUP", str(WARMUP)).replace("OTHER_TOKENS_OF", OTHER_TOKENS_OF).replace("TOKENS_OF", TOKENS_OF) \
    .replace("CPU_TICKS", CPU_TICKS)

CHILD_LLAMA = r"""
import json, sys, time
CPU_TICKS
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# no repacked copy of the weights (llama.cpp's --no-repack): with it, Q4_0 is copied into anonymous
# memory at load and the process cannot live within a budget smaller than the file
_defaults = llama_cpp.llama_cpp.llama_model_default_params
def _no_repack():
    p = _defaults(); p.use_extra_bufts = False; return p
llama_cpp.llama_cpp.llama_model_default_params = _no_repack
t_load = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
t_load = time.perf_counter() - t_load
vocab, n_all = llm.n_vocab(), WARMUP + n
toks = [int(t) for t in TOKENS_OF]
times = []
for i, tok in enumerate(toks):
    t0 = time.perf_counter(); llm.eval([tok]); times.append(time.perf_counter() - t0)
    if i == WARMUP - 1:
        ticks = cpu_ticks()
ticks = [b - a for a, b in zip(ticks, cpu_ticks())]
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"decode_s": times[WARMUP:], "cpu_ticks": ticks, "load_s": t_load, "process_peak_rss": hwm}))
""".replace("WARMUP", str(WARMUP)).replace("TOKENS_OF", TOKENS_OF).replace("CPU_TICKS", CPU_TICKS)


class Cgroup:
    """A memory cgroup with a hard limit; None-safe when the machine does not allow one."""

    def __init__(self, limit: int, name: str = "st-sdk-bench"):
        self.path = None
        for root, limit_file, peak_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.max_usage_in_bytes"),
                                            ("/sys/fs/cgroup", "memory.max", "memory.peak")):
            base = Path(root)
            if (base / "cgroup.procs").exists() and (base / ("memory.stat")).exists() or (base / limit_file).exists():
                try:
                    p = base / name
                    p.mkdir(exist_ok=True)
                    files = [limit_file]
                    if limit_file == "memory.limit_in_bytes" and (p / "memory.memsw.limit_in_bytes").exists():
                        # memory+swap must stay >= memory: raise it first, lower it last (no swap escape)
                        grow = limit > int((p / limit_file).read_text())
                        files = ["memory.memsw.limit_in_bytes", limit_file] if grow else [limit_file, "memory.memsw.limit_in_bytes"]
                    for f in files:
                        (p / f).write_text(str(limit))
                    self.path, self.peak_file = p, peak_file
                    break
                except OSError:
                    continue

    def reset_peak(self) -> None:
        if self.path is not None:
            try:
                (self.path / self.peak_file).write_text("0")
            except OSError:
                pass

    def peak(self) -> int | None:
        if self.path is None:
            return None
        try:
            return int((self.path / self.peak_file).read_text())
        except OSError:
            return None

    def run(self, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        def enter():
            if self.path is not None:
                (self.path / "cgroup.procs").write_text(str(os.getpid()))
        self.reset_peak()
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=enter, env=env)


def drop_page_cache() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        pass


def random_read_bandwidth(path: str, block: int, reads: int = 256, threads: tuple[int, ...] = (4, 8, 16)) -> float:
    """Bytes/s of `reads` reads of `block` bytes at random offsets of `path` with a cold page cache, the
    best of `threads` readers at a time, with O_DIRECT where the file allows it (as the expert cache
    reads)."""
    from concurrent.futures import ThreadPoolExecutor
    import mmap
    import random

    size = os.path.getsize(path)
    rnd = random.Random(7)
    length = -(-block // 4096) * 4096
    best = 0.0
    for n in threads:
        offsets = [rnd.randrange(0, max(1, size - length)) // 4096 * 4096 for _ in range(reads)]
        drop_page_cache()
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        try:
            buf = [mmap.mmap(-1, length) for _ in range(n)]   # page-aligned, as O_DIRECT needs

            def one(i):
                return os.preadv(fd, [buf[i % n]], offsets[i])

            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as ex:
                got = sum(ex.map(one, range(reads)))
            best = max(best, got / (time.perf_counter() - t0))
        finally:
            os.close(fd)
    drop_page_cache()
    return best


def cache_read_bandwidth(path: str, seconds: float = 3.0, in_flight: tuple[int, ...] = (4, 8, 16)) -> float | None:
    """Bytes/s at which the expert cache's own reader (st_sdk.offload.cache.ExpertCache: io_uring where the
    kernel allows it, else 4 I/O threads; each expert in three aligned pieces, O_DIRECT into huge-page
    slots) reads random experts of a prepared expert file with a cold page cache, `seconds` at each
    count of experts in flight, the best of them; None when `path` is not a prepared file. On some
    disks these reads go faster than `random_read_bandwidth`'s (one read per expert into a plain buffer)."""
    import random

    from st_sdk.offload.cache import ExpertCache
    from st_sdk.offload.prepared import HEADER, read_header

    head = read_header(Path(path))
    if not head or not all(isinstance(head.get(k), int) for k in ("stride", "layers", "experts")):
        return None
    stride, layers, experts = head["stride"], head["layers"], head["experts"]
    third = stride // 3
    parts = [[third, third, stride - 2 * third]] * layers
    cache = ExpertCache(lambda layer, e: [], parts, max(in_flight) + 1, files=(path,))
    cache.use_file(path, HEADER, experts)
    rnd = random.Random(7)
    best = 0.0
    try:
        for n in in_flight:
            drop_page_cache()
            done, t0 = cache.stats.bytes_read, time.perf_counter()
            while time.perf_counter() - t0 < seconds:   # n experts of a random layer, read as budget mode does
                layer, picked = rnd.randrange(layers), rnd.sample(range(experts), min(n, experts))
                cache.prefetch(layer, picked)
                cache.get_many(layer, picked)
            best = max(best, (cache.stats.bytes_read - done) / (time.perf_counter() - t0))
    finally:
        cache.close()
    drop_page_cache()
    return best


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--tokens", type=int, default=256, help=f"measured tokens, after {WARMUP} warm-up tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="st-sdk's backend (default auto: the automatic choice)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved (medians)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-prefetch-run", action="store_true", help="skip the run with prefetch off")
    ap.add_argument("--lookahead-run", action="store_true",
                    help="also run with prefetch='lookahead' (every guess of the next layer's experts read ahead; "
                         "the default, 'auto', reads them ahead only while the guesses pay)")
    ap.add_argument("--router-only-run", action="store_true",
                    help="also run with prefetch=True (reads start when a layer's own router picks, none ahead)")
    ap.add_argument("--policies", default="lfru",
                    help="expert-cache policies to run, comma-separated (the first is the 'st-sdk' row; default lfru, "
                         "st-sdk's default)")
    ap.add_argument("--prepared-run", action="store_true",
                    help="also run with the experts read from a prepared expert file (expert_file=True; the file is "
                         "written before the runs, outside the limit, and kept in st-sdk's cache directory)")
    ap.add_argument("--convert-run", action="store_true",
                    help="also run with no prepared expert file (expert_file=False: experts converted as they are "
                         "read, what the defaults do where the disk lacks room for the file)")
    ap.add_argument("--resident-run", action="store_true",
                    help="also run the same tokens with the whole model in memory (no budget, no cgroup; the page "
                         "cache dropped before it too), and report each st-sdk row as a share of its speed")
    ap.add_argument("--profile-run", action="store_true",
                    help="add a row that starts from expert use counts kept by an earlier load (st_sdk.offload."
                         "profile), recorded first, on other tokens, in the same cgroup; the other rows keep none")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--llama-tokens", type=int, default=None,
                    help="measured tokens for llama.cpp (default --tokens; it reads every expert from disk)")
    ap.add_argument("--json", default=None, help="also write every run to this file")
    args = ap.parse_args(argv)
    from st_sdk.offload import parse_size

    limit = parse_size(args.budget)
    cg = Cgroup(limit)
    if cg.path is None:
        print("warning: no memory cgroup could be made here; running without a hard limit", file=sys.stderr)
    ours = [sys.executable, "-c", CHILD_OURS, args.model, str(limit), str(args.tokens), str(args.threads)]
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    # the defaults (expert_file="auto"), from an empty cache directory: the first run writes what a
    # fresh machine's first load writes, the later runs and rows read it
    runs = {"st-sdk": ours + ["auto", args.backend, policies[0], "auto"]}
    if args.prepared_run:
        runs["st-sdk prepared"] = ours + ["auto", args.backend, policies[0], "1"]
    if args.convert_run:
        runs["st-sdk converting"] = ours + ["auto", args.backend, policies[0], "0"]
    for policy in policies[1:]:
        runs[f"st-sdk {policy}"] = ours + ["auto", args.backend, policy, "auto"]
    if args.router_only_run:
        runs["st-sdk router-only"] = ours + ["1", args.backend, policies[0], "auto"]
    if args.lookahead_run:
        runs["st-sdk lookahead"] = ours + ["lookahead", args.backend, policies[0], "auto"]
    if not args.no_prefetch_run:
        runs["st-sdk no-prefetch"] = ours + ["0", args.backend, policies[0], "auto"]
    if args.profile_run:
        runs["st-sdk profile"] = ours + ["auto", args.backend, policies[0], "auto"]
    if args.resident_run:
        runs["resident"] = ours[:4] + ["resident"] + ours[5:] + ["auto", args.backend, policies[0], "0"]
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            runs["llama.cpp"] = [sys.executable, "-c", CHILD_LLAMA, args.model, str(args.llama_tokens or args.tokens),
                                 str(args.threads)]
        except ImportError:
            print("llama-cpp-python is not installed: no peer run", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load0 = " ".join(f.read().split()[:3])
    print(f"# offload_budget: {args.model}, budget {args.budget} ({'cgroup limit' if cg.path else 'NOT limited'}), "
          f"{args.threads} threads, backend {args.backend}, cache policy {policies[0]}, {WARMUP} warm-up + {args.tokens} teacher-forced diverse "
          f"tokens, {args.repeats} runs each, page cache dropped before each run; load {load0}", flush=True)
    if args.prepared_run:   # written once here, outside the limit and the timed runs
        prep = subprocess.run([sys.executable, "-c", CHILD_OURS, args.model, str(limit), "0", str(args.threads),
                               "auto", args.backend, policies[0], "1"], capture_output=True, text=True,
                              timeout=args.timeout)
        if prep.returncode != 0:
            print(f"the prepared expert file could not be written: {prep.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        rec = json.loads(prep.stdout.strip().splitlines()[-1])
        print(f"# prepared expert file: {rec['plan'].rsplit(', ', 1)[-1]} ({rec['load_s']:.1f} s to load and write)",
              flush=True)
    fresh = tempfile.mkdtemp(prefix="st-sdk-bench-cache-")
    # every row starts its runs with no expert use counts kept, but the profile row
    env_of = {name: dict(os.environ, ST_SDK_CACHE_DIR=fresh, ST_OFFLOAD_PROFILE="0")
              for name in runs if name not in ("st-sdk prepared", "llama.cpp")}
    if "st-sdk prepared" in runs:   # the usual cache directory: counts kept there are neither read nor written
        env_of["st-sdk prepared"] = dict(os.environ, ST_OFFLOAD_PROFILE="0")
    try:
        if args.profile_run:   # the first load in the empty cache directory: it writes the counts (and expert file)
            env_of["st-sdk profile"] = dict(os.environ, ST_SDK_CACHE_DIR=fresh, ST_OFFLOAD_PROFILE="read")
            drop_page_cache()
            rec = cg.run(ours + ["auto", args.backend, policies[0], "auto", "other"], args.timeout,
                         dict(os.environ, ST_SDK_CACHE_DIR=fresh, ST_OFFLOAD_PROFILE="1"))
            if rec.returncode != 0:
                print(f"the expert use counts could not be recorded: {rec.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            out = json.loads(rec.stdout.strip().splitlines()[-1])
            d = out["decode_s"]
            print(f"# expert use counts recorded on {WARMUP} + {args.tokens} other tokens ({len(d) / sum(d):.2f} tok/s; "
                  f"this first load {out['load_s']:.1f} s, so the rows' loads are later ones); the profile row's runs "
                  f"start from them (ST_OFFLOAD_PROFILE=read), the others from none", flush=True)
        report(args, cg, run_all(args, cg, runs, env_of))   # before the prepared file it wrote is removed
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return 0


def run_all(args, cg: Cgroup, runs: dict, env_of: dict) -> dict[str, list]:
    """Every configuration's runs, interleaved, each printed as it ends."""
    results: dict[str, list] = {k: [] for k in runs}
    for rep in range(args.repeats):
        for name, cmd in runs.items():            # interleaved repeats
            drop_page_cache()
            t0 = time.perf_counter()
            try:
                proc = (subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env_of.get(name))
                        if name == "resident" else cg.run(cmd, args.timeout, env_of.get(name)))
            except subprocess.TimeoutExpired:
                results[name].append({"error": f"timed out after {args.timeout:.0f} s"})
                continue
            rec = {"wall_s": time.perf_counter() - t0, "peak_bytes": None if name == "resident" else cg.peak(),
                   "returncode": proc.returncode}
            if proc.returncode == 0:
                rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                d = rec["decode_s"]
                rec.update(decode_tps=len(d) / sum(d), p50_ms=pct(d, 50) * 1e3, p99_ms=pct(d, 99) * 1e3)
            elif proc.returncode in (-9, 137):
                rec["error"] = "killed (SIGKILL: out of memory in the cgroup)"
            else:
                rec["error"] = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            results[name].append(rec)
            st = rec.get("stats") or {}
            print(f"  run {rep + 1} {name:20s} " + (f"{rec['decode_tps']:7.2f} tok/s  p50 {rec['p50_ms']:7.1f} p99 "
                  f"{rec['p99_ms']:7.1f} ms" if "decode_tps" in rec else f"ERROR {rec['error']}") +
                  f"  cgroup peak {(rec['peak_bytes'] or 0) / 2**20:6.0f} MiB  process peak "
                  f"{rec.get('process_peak_rss', 0) / 2**20:6.0f} MiB" +
                  ("  steal {:.0%} kernel {:.0%}".format(*shares) if (shares := cpu_shares(rec)) else "") +
                  (f"  threads waited {rec['waited_s'] / args.tokens * 1e3:.1f} ms/token"
                   if rec.get("waited_s") is not None else "") +
                  (f"  backend {rec['backend']}  hit rate {st['hit_rate']:.1%}  read "
                   f"{st['bytes_read'] / 2**20 / args.tokens:.1f} MiB/token  stalled {st['stall_s']:.1f} s  "
                   f"major faults {st.get('major_faults', 0) / args.tokens:.1f}/token"
                   + (f"  read ahead {st['ahead']} ({st['ahead_needed_share']:.0%} of guessed reads needed, "
                      f"{'on' if st['ahead_active_at_end'] else 'off'} at the end)"
                      if st.get("ahead_needed_share") is not None else "")
                   + (f"  frameworks loaded: {rec['frameworks']}" if rec.get("frameworks") else "") if st else ""),
                  flush=True)
    return results


def cpu_shares(rec: dict) -> tuple[float, float] | None:
    """The shares of the machine's CPU time over a run's measured tokens that the hypervisor took
    (steal) and that went to the kernel (system, irq, softirq); None when not read."""
    t = rec.get("cpu_ticks")
    if not t or sum(t) <= 0:
        return None
    return t[7] / sum(t), (t[2] + t[5] + t[6]) / sum(t)


def paired_ratio(results: dict[str, list], name: str, other: str) -> float | None:
    """The median over rounds of `name`'s decode speed over `other`'s in the same round (runs are
    interleaved, so a round's two runs meet the same load); None without a round where both ran."""
    ratios = [a["decode_tps"] / b["decode_tps"] for a, b in zip(results.get(name, []), results.get(other, []))
              if a.get("decode_tps") and b.get("decode_tps")]
    return median(ratios) if ratios else None


def report(args, cg: Cgroup, results: dict[str, list]) -> None:
    """The medians of every configuration, the st-sdk plan, its first load and the disk-read bound."""
    summary = {}
    for name, recs in results.items():
        ok = [r for r in recs if "decode_tps" in r]
        shares = [sh for sh in map(cpu_shares, ok) if sh]
        summary[name] = {"decode_tps": median(r["decode_tps"] for r in ok) if ok else None,
                         "p50_ms": median(r["p50_ms"] for r in ok) if ok else None,
                         "p99_ms": median(r["p99_ms"] for r in ok) if ok else None,
                         "cgroup_peak_MiB": max((r.get("peak_bytes") or 0) for r in recs) / 2**20 if recs else None,
                         "process_peak_rss_MiB": max(r.get("process_peak_rss", 0) for r in recs) / 2**20 if recs else None,
                         "steal_share": median(a for a, _ in shares) if shares else None,
                         "kernel_share": median(b for _, b in shares) if shares else None,
                         "waited_ms_per_token": median(r["waited_s"] / args.tokens * 1e3 for r in waited)
                         if (waited := [r for r in ok if r.get("waited_s") is not None]) else None,
                         "runs": len(recs), "errors": [r["error"] for r in recs if "error" in r],
                         "stats": ok[-1].get("stats") if ok else None, "plan": ok[-1].get("plan") if ok else None,
                         "backend": ok[-1].get("backend") if ok else None,
                         "layouts": ok[-1].get("layouts") if ok else None}
    print(f"model {args.model}  budget {args.budget} ({'hard limit' if cg.path else 'NOT limited'})  "
          f"threads {args.threads}  medians of {args.repeats} runs; ratios: medians of the rounds' ratios")
    for name, s in summary.items():
        tps = s["decode_tps"]
        peer, whole = paired_ratio(results, name, "llama.cpp"), paired_ratio(results, name, "resident")
        s["x_llama_cpp"], s["of_resident"] = peer, whole
        ratio = f"{peer:6.1f}x" if peer else "   -  "
        print(f"  {name:20s} decode {tps or 0:8.2f} tok/s  {ratio} llama.cpp  p50 {s['p50_ms'] or 0:7.1f} ms  "
              f"p99 {s['p99_ms'] or 0:7.1f} ms  cgroup peak {s['cgroup_peak_MiB'] or 0:7.1f} MiB  process peak "
              f"{s['process_peak_rss_MiB'] or 0:7.1f} MiB  failed runs {len(s['errors'])}/{s['runs']}"
              + (f": {s['errors'][0]}" if s["errors"] else "")
              + (f"  {whole:.0%} of resident" if whole and name.startswith("st-sdk") else "")
              + (f"  steal {s['steal_share']:.0%} kernel {s['kernel_share']:.0%}" if s["steal_share"] is not None
                 else "")
              + (f"  threads waited {s['waited_ms_per_token']:.1f} ms/token" if s["waited_ms_per_token"] is not None
                 else ""))
    if summary.get("st-sdk", {}).get("stats"):
        st, plan = summary["st-sdk"]["stats"], summary["st-sdk"]["plan"]
        print(f"  st-sdk plan: {plan}")
        loads = [r["load_s"] for r in results["st-sdk"] if "load_s" in r]
        if loads:
            if args.profile_run:
                print(f"  st-sdk loads: {median(loads):.1f} s (median; the recording run's was the first)")
            else:
                print(f"  st-sdk load, from an empty cache directory: first {loads[0]:.1f} s (choosing the backend, "
                      f"and writing the prepared expert file where the plan reads one)"
                      + (f"; later loads {median(loads[1:]):.1f} s (median)" if len(loads) > 1 else ""))
        warm = [r["load_s"] for r in results.get("st-sdk profile", []) if "load_s" in r]
        if warm:
            # where its experts came from: the kept live shares may choose layouts that need another
            # prepared file, which its first load writes only where the disk has room
            where = (summary.get("st-sdk profile", {}).get("plan") or "").rsplit(", ", 1)[-1]
            print(f"  st-sdk profile load (the experts counted most read into the cache first): {median(warm):.1f} s "
                  f"(median; first {warm[0]:.1f} s); its experts {where or 'as planned'}")
        for name, s in summary.items():
            if name.startswith("st-sdk") and s.get("layouts"):
                print(f"  {name} expert layouts: {s['layouts']}")
        missed = st["bytes_read"] / args.tokens
        rate = missed * (summary["st-sdk"]["decode_tps"] or 0)   # the run's own read rate, bytes/s
        source = next((r["expert_file"] for r in reversed(results["st-sdk"]) if r.get("expert_file")), args.model)
        source = source if os.path.exists(source) else args.model
        bw = cache_read_bandwidth(source)
        how = "through the expert cache's reader, cold, best of 4, 8 or 16 experts in flight"
        if bw is None:   # experts converted as read from the model file: plain reads of an expert's size
            bw = random_read_bandwidth(source, max(1, st["bytes_read"] // max(1, st["reads"])))
            how = "cold, best of 4, 8 or 16 readers, expert-sized O_DIRECT reads"
        print(f"  disk-read bound: {missed / 2**20:.1f} MiB read per token / {bw / 2**20:.0f} MiB/s random-read "
              f"bandwidth of {os.path.basename(source)} ({how}) = {bw / missed if missed else float('inf'):.1f} tok/s "
              f"at most; st-sdk reached {summary['st-sdk']['decode_tps'] / (bw / missed) if missed else 0:.0%} of it, "
              f"its reads running at {rate / 2**20:.0f} MiB/s over the measured tokens"
              + (" (faster than the probe's reads: on this disk the probe's rate is no upper bound)" if rate > bw else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "budget": args.budget, "threads": args.threads,
                       "limited": cg.path is not None, "summary": summary, "runs": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
