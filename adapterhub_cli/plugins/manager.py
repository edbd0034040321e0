"""The plugin manager: built-in plugins, entry-point plugins, and the registries filled through hooks.

``load_plugins()`` runs once. It registers the built-in plugins, then each entry point of the
``adapterhub_cli`` group; a plugin that fails to import becomes a recorded warning, not a dead CLI.
``ADAPTERS_LOAD_PLUGINS`` controls entry points: unset loads all, an empty string loads none, and a
comma-separated list loads only those entry-point names.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from adapterhub_cli.errors import PluginError
from adapterhub_cli.plugins import hookspecs


BUILTIN_PLUGINS = ("adapterhub_cli.formats.builtin", "adapterhub_cli.cli.commands")
ENTRY_POINT_GROUP = "adapterhub_cli"

pm = pluggy.PluginManager("adapterhub_cli")
pm.add_hookspecs(hookspecs)

_loaded = False
#: Messages for entry-point plugins that failed to load (shown by the CLI as warnings).
load_errors: list[str] = []
_sources: dict[str, str] = {}


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin: its name, where it came from and which hooks it implements."""

    name: str
    source: str
    hooks: list[str]


def load_plugins() -> None:
    """Register built-in and entry-point plugins once (later calls do nothing)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod_name in BUILTIN_PLUGINS:
        mod = importlib.import_module(mod_name)
        if not pm.is_registered(mod):
            pm.register(mod, name=mod_name)
            _sources[mod_name] = "built-in"
    wanted = os.environ.get("ADAPTERS_LOAD_PLUGINS")
    allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as e:  # a broken third-party plugin must not take the CLI down
            load_errors.append(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}")
            continue
        dist = ep.dist
        _sources[ep.name] = f"{dist.name} {dist.version}" if dist is not None else ep.value


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin with its source and the hooks it implements."""
    load_plugins()
    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append(PluginInfo(name=name, source=_sources.get(name, "registered at run time"), hooks=hooks))
    return sorted(out, key=lambda p: (p.source != "built-in", p.name))


def collect(hook_name: str, key: Any = lambda obj: obj.name) -> dict[str, Any]:
    """Call a ``register``-style hook and return ``{name: obj}``; later registrations of a name are refused.

    Plugins registered later are called first by pluggy, so a third-party plugin can override a
    built-in only by unregistering it, never silently.
    """
    load_plugins()
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}

    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order: built-ins first

        def register(obj: Any, *args: Any, _plugin: str = impl.plugin_name, **kwargs: Any) -> None:
            name = key(obj) if not args else obj
            value = obj if not args else (args[0], kwargs)
            if name in found:
                raise PluginError(f"plugin {_plugin!r} registers {name!r}, already registered by {owners[name]!r}")
            found[name] = value
            owners[name] = _plugin

        impl.function(**dict.fromkeys(impl.argnames, register))
    return found
