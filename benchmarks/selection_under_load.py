"""Does measured backend selection hold under load? Runs `st-sdk backends MODEL --remeasure --json`
N times while another process keeps one core busy (`python -c 'while 1: pass'`), and prints, per run,
the backend chosen, every candidate's median tokens/s and spread, whether the measurement was cached,
and the load average.

    python benchmarks/selection_under_load.py MODEL.gguf [--runs 5] [--busy 1] [--threads N]

The measurement cache is a private temporary directory, so earlier runs or the user's cache play no part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--busy", type=int, default=1, help="busy-looping processes started next to it")
    ap.add_argument("--threads", type=int, default=None, help="--threads passed to st-sdk backends")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="st-sdk-selection-")
    env = dict(os.environ, ST_SDK_CACHE_DIR=cache)
    cmd = [sys.executable, "-c", "import sys; from st_sdk.cli import main; sys.exit(main())",
           "backends", args.model, "--remeasure", "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"model {args.model}; {args.runs} runs of: st-sdk {' '.join(cmd[3:])}; {args.busy} busy process(es); "
          f"cache {cache}", flush=True)
    busy = [subprocess.Popen(["nice", "-n", "0", sys.executable, "-c", "while 1: pass"]) for _ in range(args.busy)]
    chosen = []
    try:
        for i in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"run {i + 1}: failed: {out.stderr[-2000:]}")
                chosen.append(None)
                continue
            doc = json.loads(out.stdout)
            chosen.append(doc["chosen"])
            speeds = ", ".join(f"{c['name']} {c['tokens_per_s']:.1f} tok/s spread {c['spread']:.0%}"
                               for c in doc["candidates"] if c.get("tokens_per_s"))
            stored = doc["cache"].get("not_stored") or "cached"
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            print(f"run {i + 1}: chose {doc['chosen']} in {time.perf_counter() - t0:.0f} s; {speeds}; {stored}; "
                  f"notes: {'; '.join(doc['notes']) or '-'}; load average {load}", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"chosen: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
