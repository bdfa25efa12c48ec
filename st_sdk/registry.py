"""Backend discovery: a pluggy PluginManager over the `st_sdk.backends` entry-point group.

Entry points are loaded one at a time, so a plugin that fails to import is recorded with its error
and skipped; the host keeps working. Environment controls (read when the registry is built):

- ST_DISABLE_PLUGIN_AUTOLOAD=1  load only the built-in backends (and those named in ST_PLUGINS)
- ST_PLUGINS=a,b                entry-point names to load even when autoloading is disabled
- ST_BLOCK_PLUGINS=a,b          entry-point names never to load (built-ins included, except numpy,
                                the reference every fallback needs)
"""
from __future__ import annotations

import logging
import os
import threading
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import BackendError
from .plugins import ENTRY_POINT_GROUP, PROJECT

log = logging.getLogger("st_sdk")

BUILTIN_DIST = "st-sdk"
REFERENCE_PLUGIN = "numpy"


@dataclass
class PluginRecord:
    name: str                     # entry-point name (or the name given to `register`)
    source: str                   # "module.path" of the entry point, or "registered"
    dist: str | None = None       # the distribution that declared it
    error: str | None = None      # why it is not loaded (import error, blocked ...)
    backends: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _env_list(var: str) -> set[str]:
    return {s.strip() for s in os.environ.get(var, "").split(",") if s.strip()}


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginRecord] = []
        self.conflicts: list[str] = []
        self._backends: dict[str, type] | None = None
        self._provider: dict[str, str] = {}

    # ---- discovery -----------------------------------------------------------------------
    def load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        blocked = _env_list("ST_BLOCK_PLUGINS") - {REFERENCE_PLUGIN}
        wanted = _env_list("ST_PLUGINS")
        autoload = not _truthy("ST_DISABLE_PLUGIN_AUTOLOAD")
        seen: set[tuple[str, str]] = set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if (ep.name, ep.value) in seen:   # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            dist = getattr(getattr(ep, "dist", None), "name", None)
            builtin = dist == BUILTIN_DIST or ep.value.startswith("st_sdk_backends.")
            rec = PluginRecord(ep.name, ep.value, dist)
            self.plugins.append(rec)
            if ep.name in blocked:
                rec.error = "blocked by ST_BLOCK_PLUGINS"
                continue
            if not (autoload or builtin or ep.name in wanted):
                rec.error = "not loaded: ST_DISABLE_PLUGIN_AUTOLOAD is set (name it in ST_PLUGINS to load it)"
                continue
            if self.pm.has_plugin(ep.name):
                rec.error = f"another plugin is already registered under the name {ep.name!r}"
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as e:  # a broken third-party plugin must not break the host
                rec.error = f"{type(e).__name__}: {e}"
                log.warning("st-sdk plugin %r (%s) failed to load: %s", ep.name, ep.value, rec.error)
                log.debug("%s", traceback.format_exc())
        self._backends = None

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module directly (tests, notebooks, applications)."""
        name = self.pm.register(plugin, name=name)
        self.plugins.append(PluginRecord(name, "registered"))
        self._backends = None
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins = [p for p in self.plugins if p.name != name]
        self._backends = None

    def record(self, name: str) -> PluginRecord | None:
        return next((p for p in self.plugins if p.name == name), None)

    # ---- hooks ---------------------------------------------------------------------------
    def backends(self) -> dict[str, type]:
        """Backend name -> class, from every plugin's `st_sdk_backends()`, asked one at a time."""
        if self._backends is None:
            found: dict[str, type] = {}
            self._provider, self.conflicts = {}, []
            # pluggy's call order, reversed: first-registered (built-ins) claim names first
            for impl in self.pm.hook.st_sdk_backends.get_hookimpls():
                rec = self.record(impl.plugin_name)
                try:
                    classes = list(impl.function() or [])
                except Exception as e:
                    msg = f"st_sdk_backends() raised {type(e).__name__}: {e}"
                    log.warning("st-sdk plugin %r: %s", impl.plugin_name, msg)
                    if rec is not None:
                        rec.error = msg
                    continue
                for cls in classes:
                    name = getattr(cls, "name", "")
                    if not name or not isinstance(cls, type):
                        msg = f"{cls!r} is not a Backend class with a name"
                        if rec is not None:
                            rec.error = msg
                        continue
                    if name in found and found[name] is not cls:
                        self.conflicts.append(f"backend {name!r} from plugin {impl.plugin_name!r} ignored: "
                                              f"plugin {self._provider[name]!r} already provides it")
                        continue
                    found[name] = cls
                    self._provider[name] = impl.plugin_name
                    if rec is not None and name not in rec.backends:
                        rec.backends.append(name)
            self._backends = found
        return self._backends

    def provider(self, backend_name: str) -> str | None:
        self.backends()
        return self._provider.get(backend_name)

    def why_missing(self, backend_name: str) -> str:
        """Explain why no backend of that name is registered (its plugin failed or was blocked)."""
        known = ", ".join(sorted(self.backends())) or "none"
        rec = self.record(backend_name)
        if rec is not None and rec.error:
            return f"plugin {backend_name!r} ({rec.source}) is not loaded: {rec.error}"
        return f"no backend named {backend_name!r} is registered (registered: {known})"

    def select(self, candidates, hardware, config, weight_format) -> tuple[str | None, str | None, list[str]]:
        """Ask `st_sdk_select_backend` implementations in pluggy order; first usable answer wins.

        Returns (backend name, answering plugin, notes about ignored answers)."""
        usable = {c.name for c in candidates if c.available}
        notes: list[str] = []
        for impl in reversed(self.pm.hook.st_sdk_select_backend.get_hookimpls()):
            if getattr(impl, "wrapper", False) or getattr(impl, "hookwrapper", False):
                continue
            try:
                answer = impl.function(**{a: v for a, v in dict(
                    candidates=candidates, hardware=hardware, config=config,
                    weight_format=weight_format).items() if a in impl.argnames})
            except Exception as e:
                notes.append(f"selection plugin {impl.plugin_name!r} raised {type(e).__name__}: {e}")
                continue
            if answer is None:
                continue
            if answer not in usable:
                notes.append(f"selection plugin {impl.plugin_name!r} chose {answer!r}, which is not available")
                continue
            return answer, impl.plugin_name, notes
        for n in notes:
            log.warning("st-sdk: %s", n)
        return None, None, notes

    def wrap_step(self, step: Callable, backend: Any, config: Any) -> tuple[Callable, list[str]]:
        """Apply every `st_sdk_wrap_step` implementation once; returns the step and who wrapped it."""
        applied = []
        for impl in reversed(self.pm.hook.st_sdk_wrap_step.get_hookimpls()):
            if getattr(impl, "wrapper", False) or getattr(impl, "hookwrapper", False):
                continue
            try:
                wrapped = impl.function(**{a: v for a, v in dict(step=step, backend=backend, config=config).items()
                                           if a in impl.argnames})
            except Exception as e:   # a broken tracing plugin must not stop the model from loading
                log.warning("st-sdk plugin %r: st_sdk_wrap_step raised %s: %s; step left unwrapped by it",
                            impl.plugin_name, type(e).__name__, e)
                continue
            if wrapped is not None:
                step = wrapped
                applied.append(impl.plugin_name)
        return step, applied


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    global _registry
    with _lock:
        if _registry is None:
            r = Registry()
            r.load_entry_points()
            _registry = r
        return _registry


def reset_registry() -> None:
    """Forget discovered plugins (tests; after installing a plugin in a running process)."""
    global _registry
    with _lock:
        _registry = None


def reference_backend():
    """A fresh instance of the NumPy reference backend: the oracle and every fallback's implementation."""
    cls = get_registry().backends().get(REFERENCE_PLUGIN)
    if cls is None:
        raise BackendError("the NumPy reference backend is not registered (is st-sdk installed? "
                           "try `pip install -e .`)")
    return cls()
