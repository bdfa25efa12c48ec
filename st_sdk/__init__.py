"""st-sdk: run SmallThinker sparse-MoE language models locally.

Importing this package is cheap: no heavy imports, no I/O. Public names load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("st_sdk.loader", "load"),
    "Model": ("st_sdk.model", "Model"),
    "Session": ("st_sdk.model", "Session"),
    "ModelConfig": ("st_sdk.config", "ModelConfig"),
    "Backend": ("st_sdk.backend", "Backend"),
    "Param": ("st_sdk.backend", "Param"),
    "hookimpl": ("st_sdk.plugins", "hookimpl"),
    "hookspec": ("st_sdk.plugins", "hookspec"),
    "STError": ("st_sdk.errors", "STError"),
    "ConfigError": ("st_sdk.errors", "ConfigError"),
    "WeightError": ("st_sdk.errors", "WeightError"),
    "TokenizerError": ("st_sdk.errors", "TokenizerError"),
    "InputError": ("st_sdk.errors", "InputError"),
    "BackendError": ("st_sdk.errors", "BackendError"),
    "BusyError": ("st_sdk.errors", "BusyError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'st_sdk' has no attribute {name!r}")


def __dir__():
    return __all__
