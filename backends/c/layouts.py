"""Sparse ReGLU's layouts chosen layer by layer (ST_C_SPARSE_LAYOUT=auto, the default).

Whether skipping a dead neuron's bytes pays depends on how many neurons are live: the row-split up and
neuron-major down read the live neurons' rows and columns one by one, which a core reads more slowly
than the repacked layout's long streams, so they win only where few neurons are live
(docs/c_backend.md, "Sparse ReGLU"). A model's share of live neurons differs from layer to layer (the
trained routing's 4b-a0.6b: 30% in layers 0-3, 4% in layers 4-7, 26% in layers 28-31). So at load the C
backend runs a short prefill of random tokens with the up and down projections still in the file's layout
(no copy), reads each layer's share of live neurons from the fused pass's counters, and then builds
each layer's up and down in the sparse layouts where its share is below `live_threshold`, repacked
elsewhere. The counters and stage clocks are put back as they were, so the measurement leaves no
trace in `Backend.sparsity()` or `stage_seconds()`.
"""
from __future__ import annotations

import os

import numpy as np

from st_sdk.backend import Param
from st_sdk.errors import BackendError
from st_sdk.hardware import probe

from .ops import CExperts, ffi_lib, sparse_counters, stage_clocks

#: tokens of the prefill that measures each layer's share of live neurons at load
CALIBRATION_TOKENS = 32
#: below this share of live neurons a layer takes the sparse layouts (row-split up, neuron-major down),
#: per kernel variant and family of types: where `python benchmarks/sparse_reglu.py` put the expert
#: stage's crossover with the repacked layout, at 2 threads. Q4_0 and Q8_0 on AVX2 (a Zen 3 EPYC,
#: 2026-12-06): 1.08x at 35% live, 0.93x at 40%; on AVX-512 (a Zen 4 EPYC, 2026-12-05): 0.98x at 25%,
#: 1.28x at 10%. The k-quants (up kept in the file's layout, a neuron-major down) on AVX2 (`--fmt q4_k
#: --experts 128`, 2026-12-06): 0.98x at 25%, 1.10x at 20%; on AVX-512 (the Zen 4, the same command,
#: 2026-12-06): 1.01x at 30%, 1.17x at 25%.
LIVE_THRESHOLD = {("avx2", "legacy"): 0.35, ("avx512", "legacy"): 0.25, ("avx2", "k"): 0.22, ("avx512", "k"): 0.28}
#: where one maker's cores put the crossover elsewhere (st_sdk.hardware's vendor string). On an Intel
#: Xeon (2 cores of a KVM guest, AVX-512 VNNI and AMX; 2026-12-07) the same command (`--experts 512`)
#: gave Q4_0 1.31x at 40% live, 1.19x at 50%, 1.05x at 80%, 0.92x at 100%; whole decode steps, the
#: layouts' thresholds set by ST_C_SPARSE_LIVE in two processes, 8 alternating rounds of 64 steps:
#: 1.059x with every layer of the trained routing's 4b-a0.6b (4-30% live) sparse against its 26-30%
#: layers repacked, 0.994x on a file with 50% live in every layer (docs/c_backend.md, "Chosen layer
#: by layer"). The k-quants' `--fmt q4_k` gave 1.48x at 30%, 1.31x at 50%, but its Q4_K_M file's
#: decode, the same way, 1.005x with a threshold of 0.4 against 0.28, so they keep the variant's.
VENDOR_LIVE_THRESHOLD = {("GenuineIntel", "avx512", "legacy"): 0.4}
#: the layouts a layer may get
SPARSE, DENSE = "up+down", "off"
HYSTERESIS = 0.05   # how far past its threshold a layer's live share moves a layout kept from before (near the
#                     threshold both layouts run at about the same speed, which is what the threshold is)


def crossover(variant: str | None, fmt: str = "q4_0", vendor: str | None = None) -> float:
    """The measured crossover of the kernel variant and of `fmt`'s family (the k-quants, or Q4_0/Q8_0)
    on this CPU's maker's cores (`vendor`: st_sdk.hardware's, this machine's when None)."""
    family = "k" if fmt.endswith("_k") else "legacy"
    vendor = probe().vendor if vendor is None else vendor
    return VENDOR_LIVE_THRESHOLD.get((vendor, variant or "", family), LIVE_THRESHOLD.get((variant or "", family), 0.22))


def live_threshold(variant: str | None, fmt: str = "q4_0") -> float:
    """ST_C_SPARSE_LIVE (a share in [0, 1]) if set, else `crossover` for this machine."""
    text = os.environ.get("ST_C_SPARSE_LIVE", "").strip()
    if not text:
        return crossover(variant, fmt)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise BackendError(f"ST_C_SPARSE_LIVE={text!r}: expected a share of live neurons between 0 and 1")
    return value


def live_shares(backend, params, cfg, tokens: int = CALIBRATION_TOKENS) -> list[float | None]:
    """Each layer's share of live expert neurons over a prefill of `tokens` random tokens (seeded: the
    same every load) through the model as prepared so far; None for a layer the counters did not see.
    The process-wide counters, stage clocks and wait clock are left as they were."""
    ffi, lib = ffi_lib()
    n_layers = len(params.layers)
    kept, clocks, waited = sparse_counters(), stage_clocks(), backend.wait_seconds()
    try:
        tokens = max(1, min(tokens, cfg.vocab_size))
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, tokens).astype(np.int64)
        cache = backend.new_cache(cfg, tokens)
        backend.forward(cfg, params, ids, np.arange(tokens, dtype=np.int64), cache, last_only=True)
        after = sparse_counters()
    finally:
        lib.st_sparse_stats_set(ffi.cast("int64_t *", kept.ctypes.data), len(kept))
        lib.st_stage_seconds_set(ffi.new("double[]", clocks.tolist()), len(clocks))
        if waited is not None:
            lib.st_wait_seconds_set(waited)
    seen = after - kept
    return [float(live / total) if total > 0 else None for live, total in zip(seen[:n_layers, 0], seen[:n_layers, 1])]


def by_live_shares(variant: str | None, up_down_fmts: list[list[str]], shares: list,
                   kept: list[str] | None = None) -> tuple[list[str], list[float]]:
    """Each layer's layout and threshold: SPARSE where its live share (shares[i]; None or missing: not
    seen) is below the threshold of its up and down types (up_down_fmts[i]), else DENSE; but a layer
    that had a layout before (kept[i], the layouts chosen at an earlier load) keeps it until its share
    passes the threshold by more than HYSTERESIS. A layer's share moves with the text and the context
    from run to run, and under a memory budget each change of layouts writes a new prepared expert file."""
    chosen, thresholds = [], []
    for i, fmts in enumerate(up_down_fmts):
        share = shares[i] if i < len(shares) else None
        threshold = min(live_threshold(variant, fmt) for fmt in fmts)
        before = kept[i] if kept is not None and i < len(kept) else None
        margin = HYSTERESIS if before == SPARSE else -HYSTERESIS if before == DENSE else 0.0
        chosen.append(SPARSE if share is not None and share < threshold + margin else DENSE)
        thresholds.append(threshold)
    return chosen, thresholds


def choose_layouts(backend, params, cfg) -> None:
    """For a model whose up and down projections `backend.prepare` left in the file's layout for now
    (`backend.pending`): measure each layer's share of live neurons, then give each layer's up and down
    the sparse layouts below the threshold and the repacked one elsewhere. Sets `backend.layer_layouts`,
    `backend.load_live_shares` and `backend.live_thresholds`."""
    shares = live_shares(backend, params, cfg)
    chosen, thresholds = by_live_shares(backend.variant, [[getattr(lp, role).raw.fmt for role in ("up", "down")]
                                                          for lp in params.layers], shares)
    for lp, layout in zip(params.layers, chosen):
        for role in ("up", "down"):
            p = getattr(lp, role)
            if id(p.value) not in backend.pending:
                continue
            backend.pending.discard(id(p.value))
            v = CExperts(p.raw, **backend._expert_layouts(role, layout), arena=backend.arena)
            setattr(lp, role, Param(p.raw, backend._count(v, replacing=p.value)))
    backend.layer_layouts, backend.load_live_shares, backend.live_thresholds = chosen, shares, thresholds


def describe_layouts(layouts: list[str], thresholds: list[float]) -> str:
    """'auto: up+down in 12 of 32 layers (live < 35%), off in 20'."""
    n = sum(1 for x in layouts if x == SPARSE)
    lo, hi = min(thresholds, default=0.0), max(thresholds, default=0.0)
    below = f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%}-{hi:.0%}"
    return f"auto: {SPARSE} in {n} of {len(layouts)} layers (live < {below}), {DENSE} in {len(layouts) - n}"
