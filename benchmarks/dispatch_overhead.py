"""How much Python-side dispatch adds to a decode step, with the op table bound.

Method: time real decode steps with the shared harness (`st_sdk.timing.time_decode`). Then record
every op's output during one decode step and replay the same step with an op table whose ops only
return the recorded outputs: what remains is the cost of everything around the ops (Session.feed,
graph.forward, the table lookups, reshapes and residual adds): an upper bound on dispatch overhead.

The 4b-a0.6b shape has 32 layers (~4 G parameters); to stay inside shared memory the script builds
it with fewer layers (two depths), fits step = fixed + per_layer * L for both the real and the
replayed step, and extrapolates to the real depth. `--layers 32` measures the full model directly.

    python benchmarks/dispatch_overhead.py                       # fastest measured backend, q8_0
    python benchmarks/dispatch_overhead.py --backend c --unfused   # every op through graph.forward
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np


def record_and_replay(model, context: int, repeats: int) -> float:
    """Median seconds of a decode step whose ops return pre-recorded outputs."""
    from st_sdk.timing import prompt_ids

    ops = model.ops
    recorded: list = []

    def recorder(name, fn):
        def op(*a, **k):
            out = fn(*a, **k)
            recorded.append(out)
            return out
        return op

    session = model.session(capacity=context + repeats + 4)
    logits = session.feed(prompt_ids(model, context))
    tok = int(np.argmax(logits))
    model.ops = ops.wrapped(recorder)
    try:
        session.feed([tok])                      # one real decode step, every op output recorded
    finally:
        model.ops = ops
    feed = iter(())

    def replayer(name, fn):
        def op(*a, **k):
            return next(feed)
        return op

    model.ops = ops.wrapped(replayer)
    times = []
    try:
        for _ in range(repeats):
            feed = iter(recorded)
            t0 = time.perf_counter()
            session.feed([tok])
            times.append(time.perf_counter() - t0)
    finally:
        model.ops = ops
    return statistics.median(times)


def measure(preset: str, layers: int, fmt: str, backend: str, tokens: int, context: int,
            unfused: bool = False) -> dict:
    from st_sdk import synth
    from st_sdk.timing import time_decode

    cfg = synth.preset_config(preset, layers=layers)
    t0 = time.perf_counter()
    model = synth.build_model(cfg, seed=0, fmt=fmt, backend=backend)
    build_s = time.perf_counter() - t0
    if unfused:   # drive the backend op by op through graph.forward: the op table's worst case
        model.ops = dataclasses.replace(model.ops, forward=None, layer=None)
    step = statistics.median(time_decode(model, n_tokens=tokens, context=context, warmup=2).decode_s)
    dispatch = record_and_replay(model, context, repeats=max(tokens, 20))
    return {"layers": layers, "backend": model.backend.name, "fallbacks": model.selection.fallbacks,
            "fused": [op for op in ("forward", "layer") if getattr(model.ops, op) is not None],
            "step_s": step, "dispatch_s": dispatch, "ratio": dispatch / step, "build_s": build_s}


def fastest_backend(preset: str, fmt: str) -> str:
    """Measure the available backends on a 2-layer model of the shape (the selection's own rule)."""
    from st_sdk import synth

    m = synth.build_model(synth.preset_config(preset, layers=2), seed=0, fmt=fmt, backend="auto",
                          tune=True)
    print(m.selection.explain(), file=sys.stderr)
    return m.selection.chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="4b-a0.6b")
    ap.add_argument("--format", default="q8_0")
    ap.add_argument("--backend", default="fastest", help="a backend name, or 'fastest' (measured here)")
    ap.add_argument("--layers", default="2,4", help="depths to measure (comma list); one value = no fit")
    ap.add_argument("--tokens", type=int, default=12, help="timed decode steps per depth")
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--unfused", action="store_true",
                    help="ignore the backend's fused layer/forward: every op dispatched through the graph")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from st_sdk.synth import PRESETS

    backend = fastest_backend(args.preset, args.format) if args.backend == "fastest" else args.backend
    depths = [int(x) for x in args.layers.split(",")]
    rows = [measure(args.preset, L, args.format, backend, args.tokens, args.context, args.unfused) for L in depths]
    full = PRESETS[args.preset]["num_hidden_layers"]
    result = {"preset": args.preset, "format": args.format, "backend": backend, "rows": rows,
              "full_layers": full}
    if len(rows) >= 2:
        Ls = np.array([r["layers"] for r in rows], float)
        step_fit = np.polyfit(Ls, [r["step_s"] for r in rows], 1)
        disp_fit = np.polyfit(Ls, [r["dispatch_s"] for r in rows], 1)
        step_full, disp_full = np.polyval(step_fit, full), np.polyval(disp_fit, full)
        result.update(step_full_s=step_full, dispatch_full_s=disp_full, ratio_full=disp_full / step_full,
                      per_layer_step_s=step_fit[0], per_layer_dispatch_s=disp_fit[0])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.preset} ({args.format}) on {backend}{' (unfused: op by op)' if args.unfused else ''}:")
    for r in rows:
        fused = f", fused {'/'.join(r['fused'])}" if r["fused"] else ""
        fb = f", fallbacks {','.join(r['fallbacks'])}" if r["fallbacks"] else ""
        print(f"  {r['layers']:2d} layers: step {r['step_s'] * 1e3:8.2f} ms, dispatch {r['dispatch_s'] * 1e6:7.1f} us"
              f" = {100 * r['ratio']:.2f}%{fused}{fb}")
    if "ratio_full" in result:
        print(f"  {full} layers (fit): step {result['step_full_s'] * 1e3:.1f} ms, dispatch "
              f"{result['dispatch_full_s'] * 1e6:.0f} us = {100 * result['ratio_full']:.2f}% "
              f"(per layer {result['per_layer_dispatch_s'] * 1e6:.1f} us of {result['per_layer_step_s'] * 1e3:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
