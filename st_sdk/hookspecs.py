"""Hook specifications of st-sdk, each documented where it is declared (contract).

Plugins are modules (or objects) with functions marked `@st_sdk.hookimpl`, found through the
entry-point group `st_sdk.backends`; the built-in backends are plugins like any other. Every hook runs
on the control plane (once per model load or CLI command), never per token.
"""
from __future__ import annotations

from .plugins import hookspec


@hookspec
def st_sdk_backends():
    """Return a list of `st_sdk.Backend` subclasses this plugin provides.

    Called by the registry (`st_sdk.registry.Registry.backends`) once per process, when backends are
    first enumerated (the first `st_sdk.load`, `st-sdk backends`, ...), one plugin at a time: a plugin
    whose implementation raises is recorded with its error and the others still count. Return classes,
    not instances: the SDK instantiates them with `n_threads` and `dtype`. Import heavy dependencies
    in the backend's `setup()` (run once by `is_available()`), never here.
    """


@hookspec(firstresult=True)
def st_sdk_select_backend(candidates, hardware, config, weight_format):
    """Custom selection policy: return the name of the backend to use, or None to abstain.

    Called by `st_sdk.selection.select_backend` once per model load, only when the user asked for
    nothing explicit (no `backend=` argument, no ST_BACKEND), after every backend was probed and
    smoke-tested and before the measured cache and the static score are consulted.
    `candidates` is the list of `st_sdk.selection.Candidate` (read `.name`, `.available`, `.score`,
    `.fallbacks`, `.details`; do not modify), `hardware` a `st_sdk.hardware.HardwareInfo`, `config` the
    `ModelConfig` (None when no model is involved), `weight_format` the stored format ("q8_0", ...).

    First result wins (pluggy's LIFO order: the plugin registered last, or marked `tryfirst`, is
    asked first). The answering plugin is recorded in `Model.selection.rule`. A name that is not an
    available candidate is ignored with a warning, and the next plugin is asked.
    """


@hookspec
def st_sdk_wrap_step(step, backend, config):
    """Wrap the model's forward step for tracing or profiling; return a callable or None.

    Called by `st_sdk.loader.build_model` once per model load, after the op table is bound. `step` is a
    callable `step(ids, positions, cache, last_only=False) -> logits` (one prefill chunk or one decode
    step); return a callable with the same signature that calls it (timing, logging, counting...), or
    None to leave it alone. Every plugin's wrapper is applied in turn, so wrappers nest. The wrapped
    step is bound once: nothing is dispatched through pluggy per token. To wrap single ops instead, use
    `model.ops = model.ops.wrapped(fn)` in application code.
    """
