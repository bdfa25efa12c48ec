"""A/B two settings of st-sdk (environment variables) on one model file, decode steps side by side.

    python benchmarks/ab_settings.py MODEL.gguf --a ST_C_SPARSE_LIVE=0.25 --b "" --rounds 10
    python benchmarks/ab_settings.py MODEL.gguf --a ST_C_KERNELS_PATH=old.so --b ST_C_KERNELS_PATH=new.so

Each side is one process of benchmarks/cpu_vs_llama.py's st-sdk child, loaded with its variables set
(`--a`, `--b`: space-separated VAR=VALUE; "" for the environment as it is), so settings read at load or
at import (layouts, kernel builds) differ while the file, threads and host are shared. After one warm-up
round each, rounds alternate the sides (A then B, then B then A, ...): each round a 128-token prefill,
then --gen-len decode steps fed random tokens (greedy steps on random weights loop over a few tokens,
whose experts then stay in the CPU's cache). Printed per side: the median decode step and, on the C
backend, the median of each stage of the fused pass; then the median of the rounds' ratios A/B of the
step's time (above 1: B is faster) with their range.
"""
from __future__ import annotations

import argparse
import os
import sys
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_vs_llama import Child  # noqa: E402


def settings(text: str) -> dict[str, str]:
    out = {}
    for item in text.split():
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"expected VAR=VALUE, got {item!r}")
        out[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--a", default="", help="side A's variables, VAR=VALUE ...")
    ap.add_argument("--b", default="", help="side B's variables, VAR=VALUE ...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args()
    envs = {"A": settings(a.a), "B": settings(a.b)}
    spec = {"model": a.model, "threads": a.threads, "prompt_len": 128, "gen_len": a.gen_len,
            "n_ctx": 128 + a.gen_len + 16, "kind": "st-sdk", "backend": a.backend}
    load0 = open("/proc/loadavg").read().split()[:3]
    kids = {name: Child(spec, {**os.environ, **env}) for name, env in envs.items()}
    for kid in kids.values():
        kid.round()   # warm-up: page in the weights, settle the caches
    res: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(a.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            res[name].append(kids[name].round())
    for kid in kids.values():
        kid.close()
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"{a.model}, threads {a.threads}, {a.rounds} rounds of {a.gen_len} decode steps, backend {a.backend}; "
          f"load average {' '.join(load0)} before, {' '.join(load1)} after")
    for name, rounds in res.items():
        setting = " ".join(f"{k}={v}" for k, v in envs[name].items()) or "as is"
        step = median(x["decode_wall"] for x in rounds) * 1e3
        line = f"{name} ({setting}): {kids[name].ready['facts'].get('variant')}\n  decode {step:.2f} ms a token"
        if rounds[0].get("decode_stages"):
            stages = {s: median(x["decode_stages"][s] for x in rounds) * 1e3 for s in rounds[0]["decode_stages"]}
            line += "; " + ", ".join(f"{s} {v:.3f}" for s, v in stages.items())
        print(line)
    ratios = [ra["decode_wall"] / rb["decode_wall"] for ra, rb in zip(res["A"], res["B"])]
    print(f"A/B, the rounds' step times: median {median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
