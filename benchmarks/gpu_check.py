"""GPU check: on a machine with a CUDA GPU, verify the torch and jax backends against the NumPy
reference and print their decode and prefill tokens/s for the 4b-a0.6b shape.

    python benchmarks/gpu_check.py                      # synthesise the models it needs (cached)
    python benchmarks/gpu_check.py --model 4b.gguf      # time an existing 4b-a0.6b-shaped file
    python benchmarks/gpu_check.py --allow-cpu          # run the same checks without a GPU

Every model is opened with `st_sdk.load(path, backend=name, dtype=...)`; a backend that is not
available here is reported as skipped with its reason, never an error. Exit status: 0 when every
available backend passed, 1 when a check failed, 2 when no GPU was seen (unless --allow-cpu).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

BACKENDS = ("torch", "jax")
DTYPES = ("float32", "bfloat16")
#: whole-model bound, as a fraction of max|reference logit| (the conformance kit's table)
TOL = {"float32": 1e-4, "bfloat16": 8e-2}


def gpu_present() -> str | None:
    """The first CUDA device torch or jax sees, or None."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if gpus:
            return str(gpus[0])
    except Exception:
        pass
    return None


def synth_file(folder: Path, preset: str, dtype: str, layers: int | None = None) -> Path:
    """A random-weight GGUF of `preset`, written once into `folder` and reused."""
    from st_sdk import synth

    target = folder / f"{preset}-{layers or 'all'}-{dtype}.gguf"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            out = synth.write_model(tmp, preset=preset, layers=layers, formats=("gguf",), dtype=dtype)
            os.replace(out["gguf"], target)
    return target


def verify(path: Path, name: str, dtype: str, reference: np.ndarray, ids: np.ndarray) -> tuple[bool, str]:
    import st_sdk

    m = st_sdk.load(path, backend=name, dtype=dtype)
    got = m.logits(ids)
    err = float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))
    s = m.session()
    s.feed(ids[: len(ids) // 2])
    inc = np.stack([s.feed([t]) for t in ids[len(ids) // 2:]])
    inc_err = float(np.max(np.abs(inc - got[len(ids) // 2:])) / np.max(np.abs(got)))
    ok = err <= TOL[dtype] and inc_err <= TOL[dtype]
    where = m.backend.describe().get("device", "?")
    return ok, f"logits err {err:.1e}, decode-vs-full err {inc_err:.1e} (tol {TOL[dtype]:.0e}) on {where}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a 4b-a0.6b-shaped .gguf to time (default: synthesise one)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/st-sdk/gpu_check"),
                    help="where synthesised files are kept")
    ap.add_argument("--dtype", default="bf16", help="stored format of the synthesised timing model")
    ap.add_argument("--layers", type=int, default=None, help="layers of the synthesised timing model (default: all 32)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--allow-cpu", action="store_true", help="run even when no GPU is seen")
    args = ap.parse_args(argv)

    import st_sdk
    from st_sdk.timing import time_decode, time_prefill

    gpu = gpu_present()
    print(f"GPU: {gpu or 'none seen'}")
    if gpu is None and not args.allow_cpu:
        print("no CUDA GPU is visible to torch or jax; rerun with --allow-cpu to check on the CPU")
        return 2
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    failed = False

    # 1. correctness: a small hybrid model (NoPE + sliding window, untied) against the reference
    small = synth_file(cache, "tiny", "f32")
    ids = np.random.default_rng(0).integers(0, 512, 48)
    reference = st_sdk.load(small, backend="numpy").logits(ids)
    for name in BACKENDS:
        for dtype in DTYPES:
            try:
                ok, msg = verify(small, name, dtype, reference, ids)
            except st_sdk.BackendError as e:
                print(f"  {name:6s} {dtype:9s} SKIP  {e}")
                continue
            failed |= not ok
            print(f"  {name:6s} {dtype:9s} {'PASS' if ok else 'FAIL'}  {msg}")

    # 2. auto-selection must land on a GPU backend when there is a GPU
    auto = st_sdk.load(small)
    device = auto.backend.describe().get("device", "")
    print(f"auto-selection: {auto.selection.chosen} on {device}")
    if gpu and not any(s in str(device).lower() for s in ("cuda", "gpu")):
        print("  FAIL: a GPU is present but auto-selection chose a CPU backend")
        failed = True

    # 3. speed on the 4b-a0.6b shape
    path = Path(args.model) if args.model else synth_file(cache, "4b-a0.6b", args.dtype, args.layers)
    print(f"speed: {path} (prompt {args.prompt_len}, {args.gen_len} decoded tokens, batch 1)")
    for name in BACKENDS:
        try:
            m = st_sdk.load(path, backend=name)
        except st_sdk.BackendError as e:
            print(f"  {name:6s} SKIP  {e}")
            continue
        d = m.backend.describe()
        pre = time_prefill(m, args.prompt_len, repeats=3)
        dec = time_decode(m, n_tokens=args.gen_len, context=16)
        print(f"  {name:6s} {d.get('compute_dtype', '?'):9s} {d.get('device', '?')}: "
              f"prefill {pre.prefill_tps:8.1f} tok/s   decode {dec.decode_tps:7.1f} tok/s")
        del m
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
