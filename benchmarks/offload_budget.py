"""Memory-budget mode under a hard memory limit, side by side with llama.cpp on the same file.

Each runner is a child process placed in a memory cgroup (v1 `memory.limit_in_bytes` or v2
`memory.max`) whose limit is the budget, so page cache counts too. Reports decode tokens/s (median),
the cgroup's peak (page cache included, so it sits at the limit once the file has been read) and the
process's own peak RSS, and the expert-cache statistics (hit rate, bytes read, stall time) for st-sdk
with prefetch on and off. llama.cpp runs without its repacked weight copy (`--no-repack`), the only
way it fits a budget smaller than the file.

    python benchmarks/offload_budget.py MODEL.gguf --budget 1GiB [--tokens 16] [--threads 2]

Needs root (or a delegated cgroup) for the limit; without one it says so and runs unlimited.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

CHILD_OURS = r"""
import json, sys, time, numpy as np, st_sdk
path, budget, n, threads, prefetch, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
m = st_sdk.load(path, backend=backend, n_threads=threads, max_memory=budget, prefetch=prefetch, context=256)
s = m.session(capacity=64)
logits = s.feed(np.arange(8) % m.config.vocab_size)
times = []
for i in range(n + 2):
    t0 = time.perf_counter(); logits = s.feed([int(np.argmax(logits))]); times.append(time.perf_counter() - t0)
st = m.offload.stats.as_dict()
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"decode_s": times[2:], "stats": st, "plan": m.memory_plan.describe(), "backend": m.backend.name,
                  "process_peak_rss": hwm}))
"""

CHILD_LLAMA = r"""
import json, sys, time
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
llm = Llama(model_path=path, n_threads=threads, n_ctx=256, verbose=False)
toks = list(range(8))
llm.eval(toks)
times = []
for i in range(n + 2):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter(); llm.eval([tok]); times.append(time.perf_counter() - t0)
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"decode_s": times[2:], "process_peak_rss": hwm}))
"""


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

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        def enter():
            if self.path is not None:
                (self.path / "cgroup.procs").write_text(str(os.getpid()))
        self.reset_peak()
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=enter)


def drop_page_cache() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from st_sdk.offload import parse_size

    limit = parse_size(args.budget)
    cg = Cgroup(limit)
    if cg.path is None:
        print("warning: no memory cgroup could be made here; running without a hard limit", file=sys.stderr)
    runs = {"st-sdk prefetch": [sys.executable, "-c", CHILD_OURS, args.model, str(limit), str(args.tokens), str(args.threads), "1", args.backend],
            "st-sdk no-prefetch": [sys.executable, "-c", CHILD_OURS, args.model, str(limit), str(args.tokens), str(args.threads), "0", args.backend]}
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            runs["llama.cpp"] = [sys.executable, "-c", CHILD_LLAMA, args.model, str(args.tokens), str(args.threads)]
        except ImportError:
            print("llama-cpp-python is not installed: no peer run", file=sys.stderr)
    results: dict[str, list] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, cmd in runs.items():            # interleaved repeats
            drop_page_cache()
            t0 = time.perf_counter()
            try:
                proc = cg.run(cmd, args.timeout)
            except subprocess.TimeoutExpired:
                results[name].append({"error": f"timed out after {args.timeout:.0f} s"})
                continue
            rec = {"wall_s": time.perf_counter() - t0, "peak_bytes": cg.peak(), "returncode": proc.returncode}
            if proc.returncode == 0:
                rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                rec["decode_tps"] = 1.0 / median(rec["decode_s"])
            else:
                rec["error"] = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
            results[name].append(rec)
    summary = {}
    for name, recs in results.items():
        ok = [r for r in recs if "decode_tps" in r]
        summary[name] = {"decode_tps": median(r["decode_tps"] for r in ok) if ok else None,
                         "peak_MiB": max((r["peak_bytes"] or 0) for r in recs) / 2**20 if recs else None,
                         "process_peak_rss_MiB": max(r.get("process_peak_rss", 0) for r in recs) / 2**20 if recs else None,
                         "errors": [r["error"] for r in recs if "error" in r],
                         "stats": ok[-1].get("stats") if ok else None, "plan": ok[-1].get("plan") if ok else None}
    peer = summary.get("llama.cpp", {}).get("decode_tps")
    if args.json:
        print(json.dumps({"model": args.model, "budget": args.budget, "threads": args.threads,
                          "limited": cg.path is not None, "results": summary}, indent=2))
    else:
        print(f"model {args.model}  budget {args.budget} ({'hard limit' if cg.path else 'NOT limited'})  threads {args.threads}")
        for name, s in summary.items():
            tps = s["decode_tps"]
            ratio = f"{tps / peer:6.1f}x" if tps and peer else "   -  "
            print(f"  {name:20s} decode {tps or 0:8.2f} tok/s  {ratio} llama.cpp  cgroup peak {s['peak_MiB'] or 0:7.1f} MiB"
                  f"  process peak RSS {s['process_peak_rss_MiB'] or 0:7.1f} MiB"
                  + (f"  errors: {s['errors']}" if s["errors"] else ""))
            if s.get("stats"):
                st = s["stats"]
                print(f"  {'':20s} hit rate {st['hit_rate']:.1%}, read {st['bytes_read'] / 2**20:.0f} MiB, "
                      f"stalled {st['stall_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
