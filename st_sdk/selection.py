"""Backend selection, once per model load: explicit > ST_BACKEND > plugin policy > measured > static score.

Every candidate is probed: instantiated, `is_available()` (which imports its dependencies), then a
smoke run of a micro model compared with the NumPy reference: "available" means it ran and was right.
When measuring is allowed (`tune=True`, the CLI), the top candidates by static score time real decode
steps of the loaded model with the shared harness (`st_sdk.timing.time_decode`) and one decode step's
logits are validated against the reference on the same model; timings are cached on disk
(`st_sdk.selection_cache`) so the next load picks the measured winner without measuring again.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend, ModelParams, OpTable, bind_ops, prepare_params
from .config import ModelConfig
from .errors import BackendError, WeightError
from .format_support import converted, refusal, short_reason, stored_types
from .model import Model
from .registry import get_registry, reference_backend
from .testing.data import random_params

log = logging.getLogger("st_sdk")

#: logits may differ from the reference by this fraction of max|reference logit| (bf16 compute and
#: 8-bit activation quantisation stay well inside it; a wrong kernel does not)
VALIDATION_TOL = 5e-2
MEASURE_TOP = 3          # candidates measured, by static score
MEASURE_LAYERS = 4       # measured on the model's first layers (every op shape and weight format)
MEASURE_ROUNDS = 7       # rounds of interleaved decode blocks; a candidate's speed is their median
MEASURE_BLOCK_S = 0.05   # a candidate's block of decode steps in one round lasts about this long
MEASURE_CONTEXT = 8      # prompt before them
MAX_SPREAD = 0.5         # rounds disagreeing more than this (IQR / median) make a measurement not cached
STATIC_GAP = 4.0         # a measured win over a candidate scored this many times higher is timed again
OFFLOAD_SKIP = "not probed under max_memory: it would load its libraries into the budget (name it to use it anyway)"


@dataclass
class Candidate:
    name: str
    plugin: str | None = None
    version: str | None = None
    available: bool = False
    reason: str | None = None            # why unavailable (or why not eligible)
    score: float = 0.0                   # static score on this hardware and format
    validated: bool | None = None        # smoke run (and, when measured, the decode step) matched
    error: float | None = None           # measured decode-step logits error vs the reference
    tokens_per_s: float | None = None    # measured decode speed, median over rounds (None: not measured)
    spread: float | None = None          # interquartile range of the rounds' speeds over their median
    rounds: list[float] = field(default_factory=list)     # tokens/s of each interleaved round
    decode_s: list[float] = field(default_factory=list)   # every measured step
    measured: str | None = None          # "now" | "cache"
    fallbacks: list[str] = field(default_factory=list)
    native: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Selection:
    """Which backend a model runs on and why (`Model.selection`)."""

    chosen: str
    rule: str                             # the rule that decided, in words
    candidates: list[Candidate]
    hardware: Any = None
    weight_format: str = "f32"
    cache: dict[str, Any] = field(default_factory=dict)   # path, key, hit
    notes: list[str] = field(default_factory=list)
    step_wrappers: list[str] = field(default_factory=list)
    offload: Any = field(repr=False, default=None)   # (ExpertCache, MemoryPlan) under max_memory
    ops: OpTable = field(repr=False, default=None)

    @property
    def candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def fallbacks(self) -> list[str]:
        return self.candidate.fallbacks

    def explain(self) -> str:
        lines = [f"backend: {self.chosen} ({self.rule})"]
        if self.hardware is not None:
            lines.append(f"hardware: {self.hardware.summary()}")
        for c in self.candidates:
            mark = "*" if c.name == self.chosen else " "
            spread = f" spread {c.spread:.0%}" if c.spread is not None and c.spread == c.spread else ""
            speed = f"{c.tokens_per_s:8.1f} tok/s{spread} ({c.measured})" if c.tokens_per_s else f"{'-':>8s}"
            state = "ok" if c.available else f"unavailable: {c.reason}"
            if c.available and c.error is not None:
                state += f", decode logits err {c.error:.1e}"
            if c.available and c.reason:
                state += f" ({c.reason})"
            fb = f", falls back for {', '.join(c.fallbacks)}" if c.fallbacks else ""
            facts = ", ".join(f"{k} {c.details[k]}" for k in ("device", "compute_dtype", "variant", "converts")
                              if k in c.details)
            facts = f" [{facts}]" if facts and c.available else ""
            lines.append(f" {mark} {c.name:10s} score {c.score:6.1f}  {speed}  {state}{fb}{facts}")
        if self.cache:
            state = "hit" if self.cache.get("hit") else "miss"
            if self.cache.get("not_stored"):
                state += f"; this measurement was not cached: {self.cache['not_stored']}"
            lines.append(f"cache: {self.cache.get('path')} ({state})")
        lines += [f"note: {n}" for n in self.notes]
        if self.step_wrappers:
            lines.append(f"forward step wrapped by: {', '.join(self.step_wrappers)}")
        if self.offload is not None:
            cache, plan = self.offload
            st = cache.stats
            lines.append(f"memory budget: {plan.describe()}")
            lines.append(f"expert cache so far: hit rate {st.hit_rate:.1%}, {st.bytes_read / 2**20:.1f} MiB read, "
                         f"stalled {st.stall_s:.2f} s, {st.evictions} evictions")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "rule": self.rule, "weight_format": self.weight_format,
                "hardware": self.hardware.to_dict() if self.hardware is not None else None,
                "candidates": [c.to_dict() for c in self.candidates], "cache": self.cache,
                "notes": self.notes, "step_wrappers": self.step_wrappers,
                "fallbacks": self.fallbacks,
                "offload": None if self.offload is None else
                dict(self.offload[0].stats.as_dict(), plan=self.offload[1].describe())}


# ---- correctness checks ------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _micro_model(fmt: str):
    """Two layers (a global NoPE one and a windowed RoPE one), every op on a tiny shape."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, moe_num_primary_experts=4,
                      moe_num_active_primary_experts=2, moe_ffn_hidden_size=32, rope_layout=(0, 1),
                      sliding_window_layout=(0, 1), sliding_window_size=2, max_position_embeddings=64,
                      source="<smoke model>")
    return cfg, random_params(cfg, fmt=fmt, seed=1234, layout="hf")


def _decode_logits(model, context: int) -> np.ndarray:
    """Logits of one decode step after a `context`-token prompt (the prompt the timing harness uses)."""
    from .timing import prompt_ids

    s = model.session(capacity=context + 2)
    first = s.feed(prompt_ids(model, context))
    return s.feed([int(np.argmax(first))])


def _logits_error(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, np.float32)
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def smoke_test(backend: Backend, reference: Backend, fmt: str = "f32") -> str | None:
    """Run a micro model (every op, a prefill then a decode step) on the backend and compare its logits
    with the reference; None when right, else what went wrong."""
    cfg, raw = _micro_model(fmt if fmt in ("f32", "f16", "bf16", "q8_0", "q4_0") else "f32")
    try:
        got = _decode_logits(Model(cfg, prepare_params(backend, raw, cfg), backend, bind_ops(backend, reference)), 3)
    except Exception as e:
        return f"smoke run raised {type(e).__name__}: {e}"
    want = _decode_logits(Model(cfg, raw, reference, bind_ops(reference, reference)), 3)
    err = _logits_error(got, want)
    return None if err < VALIDATION_TOL else f"smoke run disagrees with the reference (relative error {err:.2e})"


def _code_stamp(cls) -> float | None:
    """Newest modification time among the files of the package that defines `cls`."""
    import inspect

    try:
        root = os.path.dirname(inspect.getfile(cls))
    except (TypeError, OSError):
        return None
    newest, seen = 0.0, 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in files:
            seen += 1
            if seen > 500:   # a backend defined inside a huge tree: stop looking
                return newest
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
            except OSError:
                pass
    return newest


def _smoke_cached(backend: Backend, reference: Backend, fmt: str, dtype, n_threads) -> str | None:
    """`smoke_test`, skipped when this backend version passed it on this machine and installation."""
    from . import selection_cache
    from .hardware import probe, probe_gpus

    key = selection_cache.probe_key(probe_gpus(probe()), backend.name, str(backend.version), fmt, dtype, n_threads)
    key["code"] = _code_stamp(type(backend))   # an edited or rebuilt backend is smoke-tested again
    if selection_cache.probe_passed(key):
        return None
    problem = smoke_test(backend, reference, fmt)
    if problem is None:
        selection_cache.store_probe_pass(key)
    return problem


# ---- measurement ---------------------------------------------------------------------------------
def measured_slice(config, params: ModelParams, layers: int = MEASURE_LAYERS):
    """(config, params) of the model's first `layers` layers with its embedding, norm and head: every
    op shape and weight format of the model at a fraction of the memory and preparation time."""
    n = min(layers, config.num_hidden_layers)
    if n == config.num_hidden_layers:
        return config, params
    cfg = config.replace(num_hidden_layers=n, rope_layout=config.rope_layout[:n],
                         sliding_window_layout=config.sliding_window_layout[:n])
    return cfg, ModelParams(embed=params.embed, layers=list(params.layers[:n]), norm=params.norm, head=params.head)


def measure(candidates: list[Candidate], instances: dict[str, Backend], reference: Backend, config,
            params: ModelParams, rounds: int = MEASURE_ROUNDS, context: int = MEASURE_CONTEXT) -> dict:
    """Validate one decode step's logits of each candidate against the reference, then time the
    candidates' decode steps interleaved round by round (`time_candidates`), on the model's first
    MEASURE_LAYERS layers. Fills the candidates in place (a candidate that fails or disagrees is marked
    unavailable with the reason); returns the prepared models, name -> Model, for timing them again."""
    config, params = measured_slice(config, params)
    want = _decode_logits(Model(config, params, reference, bind_ops(reference, reference)), context)
    models = {}
    for c in candidates:
        b = instances[c.name]
        try:
            prepared = params if b is reference else prepare_params(b, params, config)
            model = Model(config, prepared, b, bind_ops(b, reference))
            c.error = 0.0 if b is reference else _logits_error(_decode_logits(model, context), want)
        except Exception as e:
            c.available, c.validated, c.reason = False, False, f"measurement raised {type(e).__name__}: {e}"
            continue
        c.validated = c.error < VALIDATION_TOL
        if not c.validated:
            c.available = False
            c.reason = f"decode logits disagree with the reference (relative error {c.error:.2e})"
            continue
        models[c.name] = model
    time_candidates(candidates, models, rounds, context)
    return models


def time_candidates(candidates: list[Candidate], models: dict, rounds: int = MEASURE_ROUNDS,
                    context: int = MEASURE_CONTEXT) -> None:
    """Decode speed of each model, interleaved round by round (`st_sdk.timing.interleaved_decode`):
    a candidate's tokens/s is the median over the rounds, its spread their interquartile range over it."""
    from statistics import median

    from .timing import interleaved_decode, robust_spread

    timings = interleaved_decode(models, rounds=rounds, block_s=MEASURE_BLOCK_S, context=context)
    for c in candidates:
        t = timings.get(c.name)
        if t is None:
            continue
        if t.error is not None:
            c.available, c.validated, c.reason = False, False, f"measurement raised {t.error}"
            continue
        c.measured, c.decode_s, c.rounds = "now", list(t.decode_s), list(t.decode_rounds)
        c.tokens_per_s, c.spread = median(t.decode_rounds), robust_spread(t.decode_rounds)


def contradiction(candidates: list[Candidate]) -> str | None:
    """Why the measured winner is doubtful (it beat a candidate STATIC_GAP times its static score), or None."""
    measured = [c for c in candidates if c.available and c.tokens_per_s]
    if len(measured) < 2:
        return None
    best = max(measured, key=lambda c: c.tokens_per_s)
    fav = max(measured, key=lambda c: c.score)
    if best is fav or fav.score <= 0 or fav.score < STATIC_GAP * max(best.score, 1e-9):
        return None
    return (f"{best.name} measured faster than {fav.name} ({best.tokens_per_s:.1f} vs {fav.tokens_per_s:.1f} tok/s) "
            f"against static scores {best.score:g} vs {fav.score:g}")


# ---- the decision --------------------------------------------------------------------------------
def _requested(spec) -> tuple[list[str] | None, str]:
    if isinstance(spec, Backend):
        return [spec.name], "explicit backend= argument"
    if isinstance(spec, str) and spec.strip() not in ("", "auto"):
        return [s.strip() for s in spec.split(",") if s.strip()], "explicit backend= argument"
    if isinstance(spec, (list, tuple)) and spec:
        return [getattr(s, "name", s) for s in spec], "explicit backend= argument"
    env = os.environ.get("ST_BACKEND", "").strip()
    if env and env != "auto":
        return [s.strip() for s in env.split(",") if s.strip()], "ST_BACKEND"
    return None, "auto"


def _probe(name: str, spec, classes, registry, reference: Backend, dtype, n_threads, fmt, hardware) -> \
        tuple[Candidate, Backend | None]:
    c = Candidate(name, plugin=registry.provider(name))
    given = [s for s in (spec if isinstance(spec, (list, tuple)) else [spec]) if isinstance(s, Backend)]
    b = next((s for s in given if s.name == name), None)
    if b is None:
        if name not in classes:
            c.reason = registry.why_missing(name)
            return c, None
        try:
            b = reference if name == reference.name else classes[name](n_threads=n_threads, dtype=dtype)
        except Exception as e:
            c.reason = f"constructor raised {type(e).__name__}: {e}"
            return c, None
    c.version = str(getattr(b, "version", "?"))
    try:
        ok = bool(b.is_available())
    except Exception as e:
        ok, c.reason = False, f"is_available() raised {type(e).__name__}: {e}"
    if not ok:
        c.reason = c.reason or b.unavailable_reason() or "is_available() returned False"
        return c, None
    try:
        table = bind_ops(b, reference)
        c.fallbacks, c.native = list(table.fallbacks), list(table.native)
        c.details = dict(b.describe() or {})
    except Exception as e:
        c.reason = f"{type(e).__name__}: {e}"
        return c, None
    problem = None if b is reference else _smoke_cached(b, reference, fmt, dtype, n_threads)
    c.validated = problem is None
    if problem:
        c.reason = problem
        return c, None
    c.available = True
    return c, b


def select_backend(spec="auto", *, config=None, params=None, dtype=None, n_threads=None, strict=False,
                   tune=False, weight_format=None, remeasure=False, offload=False) -> tuple[Backend, Selection]:
    """Choose the backend for a model; returns the instance and the `Selection` that explains it.

    spec: "auto", a name, a comma priority list, a list of names, or a Backend instance. tune=True
    allows measuring (when no cached measurement fits); remeasure=True measures even on a cache hit.
    offload=True (max_memory): "auto" probes only the reference and `supports_offload = True` backends."""
    from .hardware import probe, probe_gpus

    registry = get_registry()
    classes = registry.backends()
    reference = reference_backend()
    wanted, rule = _requested(spec)
    fmt = weight_format or "f32"
    hardware = probe_gpus(probe())   # asks only frameworks already imported
    candidates: list[Candidate] = []
    instances: dict[str, Backend] = {}
    for name in (wanted or list(classes)):
        # under max_memory, "auto" leaves out backends that run the MoE on the reference
        if offload and not wanted and name != reference.name and getattr(classes[name], "supports_offload", 0) is not True:
            candidates.append(Candidate(name, plugin=registry.provider(name), reason=OFFLOAD_SKIP))
            continue
        c, b = _probe(name, spec, classes, registry, reference, dtype, n_threads, fmt, hardware)
        candidates.append(c)
        if b is not None:
            instances[name] = b
    if not wanted:   # plugins that failed to load are candidates too: the report says why they are absent
        candidates += [Candidate(r.name, plugin=r.name, reason=f"plugin {r.source} not loaded: {r.error}")
                       for r in registry.plugins if r.error and not r.backends and r.name not in classes]
    if instances.keys() - {reference.name}:
        hardware = probe_gpus(probe())   # GPU backends imported their framework while probing
    for c in candidates:   # scored once the hardware (GPUs included) is known
        if c.name in instances:
            try:
                c.score = float(instances[c.name].score(hardware, fmt))
            except Exception as e:
                c.reason = f"score() raised {type(e).__name__}: {e}"
    notes = list(registry.conflicts)
    cache_info: dict[str, Any] = {}
    types = stored_types(params) if params is not None else {}
    for c in candidates:   # a backend that cannot run every stored type of the file is not a candidate
        b = instances.get(c.name)
        if b is not None and c.available:
            why = short_reason(b, types)
            if why:
                c.available, c.reason = False, why
            elif converted(b, types):
                c.details["converts"] = f"{', '.join(converted(b, types))} at load"
    usable = [c for c in candidates if c.available]

    if wanted:
        refused = [instances[c.name] for c in candidates if c.name in instances and not c.available]
        if not usable and refused:
            source = next((p.raw.source for _, p in params.all() if p.raw.source), "")
            raise WeightError(refusal(refused[0], types, classes, config, source))
        if not usable:
            raise BackendError(f"requested backend {', '.join(wanted)} ({rule}) cannot be used: " +
                               "; ".join(f"{c.name}: {c.reason}" for c in candidates))
        chosen = usable[0]   # the first of the priority list that works
        if chosen.name != wanted[0]:
            rule += f", fell back from {wanted[0]} ({candidates[0].reason})"
            log.warning("st-sdk: backend %s is unusable (%s); using %s", wanted[0], candidates[0].reason, chosen.name)
    else:
        if strict:
            for c in usable:
                if c.fallbacks:
                    c.available, c.reason = False, f"strict=True and it falls back for {', '.join(c.fallbacks)}"
            usable = [c for c in usable if c.available]
        if not usable:
            raise BackendError("no backend is available: " + "; ".join(f"{c.name}: {c.reason}" for c in candidates))
        chosen = None
        pick, plugin, policy_notes = registry.select(candidates, hardware, config, fmt)
        notes += policy_notes
        if pick is not None:
            chosen, rule = next(c for c in usable if c.name == pick), f"selection plugin {plugin!r}"
        elif config is not None:
            chosen, rule, cache_info = _measured_choice(usable, instances, reference, config, params, hardware,
                                                        fmt, dtype, n_threads, tune, remeasure)
            notes += cache_info.pop("notes", [])
        if chosen is None:
            usable = [c for c in usable if c.available]   # measurement may have ruled some out
            if not usable:
                raise BackendError("no backend passed validation: " +
                                   "; ".join(f"{c.name}: {c.reason}" for c in candidates))
            chosen = max(usable, key=lambda c: c.score)   # stable: ties go to the first registered
            rule = "static score" + ("" if config is not None and tune else
                                     " (no cached measurement; pass tune=True or run `st-sdk backends MODEL --measure`)"
                                     if config is not None else "")
    sel = Selection(chosen=chosen.name, rule=rule, candidates=candidates, hardware=hardware, weight_format=fmt,
                    cache=cache_info, notes=notes,
                    ops=bind_ops(instances[chosen.name], reference, strict=strict))
    speed = f", {chosen.tokens_per_s:.1f} tok/s" if chosen.tokens_per_s else ""
    fb = f", NumPy fallback for {', '.join(chosen.fallbacks)}" if chosen.fallbacks else ""
    log.info("st-sdk: backend %s chosen by %s%s%s", chosen.name, rule, speed, fb)
    return instances[chosen.name], sel


def _measured_choice(usable, instances, reference, config, params, hardware, fmt, dtype, n_threads, tune,
                     remeasure):
    """The measured winner (from the cache, or measured now when tune), its rule and the cache facts.
    A measurement is cached only when every candidate's rounds agree (spread <= MAX_SPREAD) and, when it
    contradicted the static scores, timing them again confirmed it; otherwise info['not_stored'] says why."""
    from . import selection_cache

    key = selection_cache.cache_key(hardware, config, fmt, {c.name: c.version for c in usable}, dtype, n_threads)
    info = {"path": str(selection_cache.cache_path()), "key": selection_cache.key_hash(key), "hit": False}
    entry = None if remeasure else selection_cache.load(key)
    notes = []
    if entry is not None:
        info["hit"] = True
        for c in usable:
            t = entry["timings"].get(c.name)
            if t is None:
                continue
            c.measured, c.decode_s, c.error = "cache", list(t.get("decode_s", [])), t.get("error")
            c.tokens_per_s, c.validated = t.get("tokens_per_s"), t.get("validated")
            c.spread, c.rounds = t.get("spread"), list(t.get("rounds", []))
            if c.validated is False:
                c.available, c.reason = False, t.get("reason") or "failed validation when measured"
    elif tune and params is not None:
        top = sorted(usable, key=lambda c: -c.score)[:MEASURE_TOP]
        t0 = time.perf_counter()
        models = measure(top, instances, reference, config, params)
        doubt = contradiction(top)
        if doubt:   # timed again before it is believed
            time_candidates(top, models, MEASURE_ROUNDS, MEASURE_CONTEXT)
            again = contradiction(top)
            notes.append(f"{doubt}; timed again: " + (f"confirmed ({again})" if again else "it was not (the second "
                                                      "measurement is used)"))
            if not again:
                info["not_stored"] = "two measurements disagreed"
        models = None
        log.debug("st-sdk: measured %s in %.1fs", ", ".join(c.name for c in top), time.perf_counter() - t0)
        noisy = [c for c in top if c.spread is not None and c.spread > MAX_SPREAD]
        if noisy:
            info["not_stored"] = ", ".join(f"{c.name}'s rounds spread {c.spread:.0%}" for c in noisy) + \
                f" (more than {MAX_SPREAD:.0%}: is the machine busy? measure again when it is quieter)"
        if config.num_hidden_layers > MEASURE_LAYERS:
            notes.append(f"decode speeds measured on the first {MEASURE_LAYERS} of {config.num_hidden_layers} "
                         f"layers, {MEASURE_ROUNDS} interleaved rounds")
        timings = {c.name: {"tokens_per_s": c.tokens_per_s, "decode_s": c.decode_s, "error": c.error,
                            "spread": c.spread, "rounds": c.rounds,
                            "validated": c.validated, "reason": None if c.available else c.reason}
                   for c in top if c.measured or c.validated is False}
        if "not_stored" in info:
            log.warning("st-sdk: measurement not cached: %s", info["not_stored"])
        else:
            try:
                info["path"] = str(selection_cache.store(key, timings))
            except OSError as e:
                log.warning("st-sdk: cannot write the selection cache (%s); measuring again next time", e)
    else:
        return None, None, info
    info["notes"] = notes
    measured = [c for c in usable if c.available and c.tokens_per_s]
    if not measured:
        return None, None, info
    best = max(measured, key=lambda c: c.tokens_per_s)
    others = sorted((c for c in measured if c is not best), key=lambda c: -c.tokens_per_s)
    vs = "".join(f" > {c.name} {c.tokens_per_s:.1f}" for c in others)
    rule = (f"measured decode speed ({best.name} {best.tokens_per_s:.1f}{vs} tok/s"
            f"{', cached' if info['hit'] else ''})")
    return best, rule, info
