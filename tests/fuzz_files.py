"""The larger fuzz run: thousands of seeded mutants of tiny GGUF files and HF directories (every stored
format), each loaded, run and generated from on numpy and c in a forked child (tests/fuzzing.py), with
the outcomes per category and per backend:

    python tests/fuzz_files.py [--files 5000] [--seed 0] [--timeout 60] [--json out.json]

Verdicts: ok-rejected (an st-sdk error naming the file), ok-loaded (a valid file loaded; finite logits
unless its tensor data was mutated), and the failures: signal, hang, raw (an exception that is not an
st-sdk error), invalid-loaded (a file that is not valid loaded), nonfinite, unnamed (an error not naming
the file), valid-rejected (a file only its tensor data differs in was refused).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzzing import FAILURES, Draw, draw_case, run_case, warm, write_bases  # noqa: E402

VERDICTS = ("ok-rejected", "ok-loaded", *FAILURES, "valid-rejected")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000, help="mutants to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a child counts as hung")
    ap.add_argument("--json", help="write every case and the tallies here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="st-sdk-fuzz-"))
    os.environ.setdefault("ST_SDK_CACHE_DIR", str(work / "cache"))   # smoke verdicts, not the user's cache
    bases = write_bases(work / "bases")
    warm(bases)
    print(f"{args.files} mutants, seed {args.seed}, timeout {args.timeout:.0f} s, bases: "
          + ", ".join(str(p.relative_to(work)) for _, p, _, _ in bases), flush=True)
    d = Draw(np.random.default_rng(args.seed))
    tally: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    cases, failures, t0, n = [], [], time.perf_counter(), 0
    while n < args.files:
        case = draw_case(bases, d)
        if case is None:
            continue
        n += 1
        out = work / "mutant"
        verdicts, reports = run_case(case, out, timeout=args.timeout)
        shutil.rmtree(out, ignore_errors=True)
        m = case[0]
        for backend, v in verdicts:
            tally[(m.category, backend)][v] += 1
            if v in FAILURES or v == "valid-rejected":
                failures.append({"category": m.category, "what": m.what, "expect": m.expect, "backend": backend,
                                 "verdict": v, "report": next(r for r in reports if r["backend"] == backend)})
        cases.append({"category": m.category, "what": m.what, "expect": m.expect, "verdicts": verdicts})
        if n % 250 == 0:
            print(f"  {n} mutants, {time.perf_counter() - t0:.0f} s, {len(failures)} failures", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"\n{n} mutants in {elapsed:.0f} s (load average {open('/proc/loadavg').read().split()[0]})\n")
    head = f"{'category':22s} {'backend':7s} " + " ".join(f"{v:>14s}" for v in VERDICTS)
    print(head)
    total: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (cat, backend), c in sorted(tally.items()):
        total[backend].update(c)
        print(f"{cat:22s} {backend:7s} " + " ".join(f"{c[v]:14d}" for v in VERDICTS))
    for backend, c in sorted(total.items()):
        print(f"{'all':22s} {backend:7s} " + " ".join(f"{c[v]:14d}" for v in VERDICTS))
    for f in failures[:50]:
        print(f"FAILURE {f['category']} {f['backend']} {f['verdict']}: {f['what']} -> {f['report'].get('error', '')[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": cases, "failures": failures,
                                               "tally": {f"{c}/{b}": dict(v) for (c, b), v in tally.items()}}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(f["verdict"] in FAILURES for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
