"""Backend discovery: a pluggy PluginManager over the `st_sdk.backends` entry-point group.

Entry points are loaded one at a time, so a plugin that fails to import is recorded with its error
and skipped; the host keeps working.
"""
from __future__ import annotations

import logging
import os
import threading
import traceback
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .plugins import ENTRY_POINT_GROUP, PROJECT

log = logging.getLogger("st_sdk")


@dataclass
class PluginRecord:
    name: str
    source: str
    error: str | None = None
    backends: list[str] = field(default_factory=list)


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginRecord] = []
        self._backends: dict[str, type] | None = None

    def load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        blocked = {s.strip() for s in os.environ.get("ST_BLOCK_PLUGINS", "").split(",") if s.strip()}
        autoload = os.environ.get("ST_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            builtin = ep.value.startswith("st_sdk_backends.")
            if ep.name in blocked or (not autoload and not builtin):
                self.plugins.append(PluginRecord(ep.name, ep.value, error="blocked by "
                                    + ("ST_BLOCK_PLUGINS" if ep.name in blocked else "ST_DISABLE_PLUGIN_AUTOLOAD")))
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
                self.plugins.append(PluginRecord(ep.name, ep.value))
            except Exception as e:  # a broken third-party plugin must not break the host
                err = f"{type(e).__name__}: {e}"
                log.warning("st-sdk plugin %r (%s) failed to load: %s", ep.name, ep.value, err)
                log.debug("%s", traceback.format_exc())
                self.plugins.append(PluginRecord(ep.name, ep.value, error=err))

    def register(self, plugin, name: str | None = None) -> None:
        """Register a plugin object or module directly (tests, notebooks, applications)."""
        self.pm.register(plugin, name=name)
        self.plugins.append(PluginRecord(name or getattr(plugin, "__name__", repr(plugin)), "registered"))
        self._backends = None

    def backends(self) -> dict[str, type]:
        if self._backends is None:
            found: dict[str, type] = {}
            for plugin_name, impl in ((i.plugin_name, i) for i in self.pm.hook.st_sdk_backends.get_hookimpls()):
                try:
                    classes = impl.function()
                except Exception as e:
                    rec = next((p for p in self.plugins if p.name == plugin_name), None)
                    if rec is not None:
                        rec.error = f"st_sdk_backends() raised {type(e).__name__}: {e}"
                    continue
                for cls in classes or []:
                    found.setdefault(cls.name, cls)
                    rec = next((p for p in self.plugins if p.name == plugin_name), None)
                    if rec is not None and cls.name not in rec.backends:
                        rec.backends.append(cls.name)
            self._backends = found
        return self._backends


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
