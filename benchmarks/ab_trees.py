"""A/B two installations of st-sdk (two checkouts, each with its own interpreter) on one model file.

    python benchmarks/ab_trees.py MODEL.gguf --a /usr/bin/python3 --b .venv/bin/python \\
        --backend torch,jax --threads 2 --rounds 7 --gen-len 16

For each backend, one `st-sdk bench` worker process per side loads the model; rounds alternate the
sides (A then B, then B then A, ...), so load on a shared machine hits both alike. Each round is the
bench harness's (`st_sdk.timing.time_round`): a fresh prompt prefill, then greedy decode steps.
Printed: the whole configuration (each side's interpreter, st-sdk location and commit, the backend's
own description), the load average at every round, each side's median prefill and decode tokens/s
and the median of the per-round ratios B/A. `--reload` starts each side's worker afresh for every
round and keeps only one alive (for models where two copies do not fit in memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from statistics import median


def side_info(python: str) -> dict:
    code = ("import importlib.util as u, json, os, subprocess, st_sdk\n"
            "try:\n    new = u.find_spec('st_sdk.bench.worker') is not None\n"
            "except ModuleNotFoundError:\n    new = False\n"
            "root = os.path.dirname(os.path.dirname(st_sdk.__file__))\n"
            "rev = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], capture_output=True,"
            " text=True).stdout.strip()\n"
            "dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],"
            " capture_output=True, text=True).stdout.strip()\n"
            "print(json.dumps({'root': root, 'commit': rev + (' (modified)' if dirty else ''), 'new': new}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout)


class Worker:
    def __init__(self, python: str, info: dict, spec: dict, env: dict):
        module = ["-m", "st_sdk.bench.worker"] if info["new"] else ["-m", "st_sdk.bench", "--worker"]
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([python, *module, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
                                     cwd=tempfile.gettempdir())
        self.hello = self.recv()
        if not self.hello.get("ready"):
            raise SystemExit(f"{python}: the worker did not start: {self.hello}")

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            tail = self.err.read().decode(errors="replace").strip().splitlines()[-5:]
            return {"error": f"exited with code {self.proc.returncode}: " + " | ".join(tail)}
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        res = self.recv()
        if "error" in res:
            raise SystemExit(f"worker failed: {res['error']}")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.err.close()


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--a", default="python", help="interpreter of side A (default: python on PATH)")
    ap.add_argument("--b", default=sys.executable, help="interpreter of side B (default: this one)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--reload", action="store_true", help="one worker alive at a time, restarted every round")
    args = ap.parse_args()

    pythons = [os.path.abspath(p) if os.sep in p else p for p in (args.a, args.b)]
    sides = {name: (py, side_info(py)) for name, py in zip("AB", pythons)}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(args.threads)
    print(f"model: {args.model}   threads: {args.threads}   prompt: {args.prompt_len}   decode: {args.gen_len} "
          f"tokens   rounds: {args.rounds} (+{args.warmup} warm-up), sides alternating"
          f"{', workers reloaded every round' if args.reload else ''}")
    for name, (python, info) in sides.items():
        print(f"side {name}: {python} -> st-sdk at {info['root']} ({info['commit']})")
    for backend in [b.strip() for b in args.backend.split(",") if b.strip()]:
        spec = {"kind": "st", "backend": backend, "model": args.model, "use_file": True, "threads": args.threads,
                "n_ctx": args.prompt_len + args.gen_len + 16, "preset": "tiny", "fmt": "file", "seed": 0}
        workers = {} if args.reload else {n: Worker(py, info, spec, env) for n, (py, info) in sides.items()}
        for n, w in workers.items():
            print(f"  {backend} {n}: {w.hello.get('variant')}; loaded in {w.hello.get('load_s', 0):.1f} s")
        runs: dict[str, list[tuple[float, float]]] = {n: [] for n in sides}
        for r in range(args.warmup + args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for n in order:
                w = workers.get(n) or Worker(sides[n][0], sides[n][1], spec, env)
                la = loadavg()
                res = w.ask(op="round", prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=1)
                if args.reload:
                    w.close()
                pre = args.prompt_len / res["prefill_s"]
                dec = len(res["decode_s"]) / sum(res["decode_s"])
                tag = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}"
                print(f"  {backend} {tag:8s} {n}: prefill {pre:7.1f} tok/s  decode {dec:6.2f} tok/s  (load {la})",
                      flush=True)
                if r >= args.warmup:
                    runs[n].append((pre, dec))
        for w in workers.values():
            w.close()
        a, b = runs["A"], runs["B"]
        for i, what in ((0, "prefill"), (1, "decode")):
            ratio = median(y[i] / x[i] for x, y in zip(a, b))
            print(f"{backend} {what}: A {median(x[i] for x in a):.2f} tok/s, B {median(y[i] for y in b):.2f} tok/s, "
                  f"B/A {ratio:.3f} (median of {len(a)} paired rounds)")
    print(f"load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
