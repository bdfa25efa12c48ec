"""Which backends run which stored weight types, and the error when a file holds a type its backend
cannot run: the tensor, its type, the backends that can, and how to re-quantise the file."""
from __future__ import annotations

from typing import Any

#: mixes suggested for re-quantising, best first: the first whose every type a backend runs is offered
SUGGESTED = (("q4_k_m", False), ("q8_0", False), ("q4_0", True), ("f16", False))


def stored_types(params) -> dict[str, str]:
    """Stored format -> the first tensor of the model stored in it."""
    out: dict[str, str] = {}
    for _, p in params.all():
        out.setdefault(p.raw.fmt, p.raw.name)
    return out


def cannot_run(backend, types: dict[str, str]) -> list[str]:
    """The formats of `types` this backend neither runs nor converts."""
    return [f for f in types if not backend.runs(f)]


def converted(backend, types: dict[str, str]) -> list[str]:
    """The formats of `types` this backend converts at load (rather than running them as stored)."""
    return [f for f in types if f not in backend.formats and f in backend.converts]


def short_reason(backend, types: dict[str, str]) -> str | None:
    bad = cannot_run(backend, types)
    if not bad:
        return None
    return "cannot run " + ", ".join(f"{f} (tensor '{types[f]}')" for f in bad)


def requantize_hint(backend, config, path: str) -> str:
    """`st-sdk quantize` command that writes `path` as types this backend runs."""
    from .weights.mixes import tensor_types

    for mix, pure in SUGGESTED:
        if config is None or all(backend.runs(t) for t in tensor_types(config, mix, pure).values()):
            return f"st-sdk quantize {path} OUT.gguf --type {mix}{' --pure' if pure else ''}"
    return f"st-sdk quantize {path} OUT.gguf --type f16"


def refusal(backend, types: dict[str, str], classes: dict[str, Any], config, source: str) -> str:
    """The message of the error raised when `backend` was asked for and cannot run the file's types."""
    fmt = cannot_run(backend, types)[0]
    able = [n for n, cls in classes.items() if _runs(cls, fmt)]
    runs = ", ".join(sorted(set(backend.formats) | set(backend.converts), key=_order))
    where = f"{source}: " if source else ""
    return (f"{where}tensor '{types[fmt]}' is stored as {fmt}, which backend '{backend.name}' cannot run "
            f"(it runs {runs}); backends that run {fmt}: {', '.join(able) or 'none installed'}. Load it on one "
            f"of those, or re-quantise the file to types '{backend.name}' runs: "
            f"{requantize_hint(backend, config, source or 'MODEL')}")


def _runs(cls, fmt: str) -> bool:
    return fmt in getattr(cls, "formats", ()) or fmt in getattr(cls, "converts", ())


def _order(fmt: str) -> int:
    from .weights.tensor import FORMATS

    return FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS)
