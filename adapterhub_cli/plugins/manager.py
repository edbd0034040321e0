"""The plugin manager: built-in plugins, entry-point plugins, and the registries filled through hooks.

``load_plugins()`` runs once. It registers the built-in plugins, then each entry point of the
``adapterhub_cli`` group; a plugin that fails to import becomes a recorded warning, not a dead CLI.
``ADAPTERS_LOAD_PLUGINS`` controls entry points: unset loads all, an empty string loads none, and a
comma-separated list loads only those entry-point names.

The built-in commands are a plugin too, registered by ``adapterhub_cli.cli.main.build_cli`` through
:func:`register_builtin` (this module sits below the CLI and never imports it).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from adapterhub_cli.errors import PluginError
from adapterhub_cli.plugins import hookspecs


#: Built-in plugin modules below the CLI, registered by :func:`load_plugins` before any entry point.
BUILTIN_PLUGINS = (
    "adapterhub_cli.formats.builtin",
    "adapterhub_cli.ops.builtin_methods",
    "adapterhub_cli.stores.builtin",
)
ENTRY_POINT_GROUP = "adapterhub_cli"
BUILTIN = "built-in"

pm = pluggy.PluginManager("adapterhub_cli")
pm.add_hookspecs(hookspecs)

_loaded = False
#: Messages for plugins that failed to load or to register something (shown by the CLI as warnings).
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
        register_builtin(importlib.import_module(mod_name), mod_name)
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


def register_builtin(plugin: object, name: str) -> None:
    """Register one of the product's own plugins (once; later calls with the same plugin do nothing)."""
    if not pm.is_registered(plugin):
        pm.register(plugin, name=name)
    _sources[name] = BUILTIN


def is_builtin(name: str) -> bool:
    """Whether the plugin registered as ``name`` is one of the product's own."""
    return _sources.get(name) == BUILTIN


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin with its source and the hooks it implements."""
    load_plugins()
    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append(PluginInfo(name=name, source=_sources.get(name, "registered at run time"), hooks=hooks))
    return sorted(out, key=lambda p: (p.source != BUILTIN, p.name))


def implementations(hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
    """``(plugin name, call)`` for each implementation of a hook: built-ins first, then in registration order.

    ``call(**kwargs)`` calls the implementation with the keyword arguments it takes (pluggy's rule: an
    implementation may accept fewer arguments than the spec).
    """
    load_plugins()
    impls = list(reversed(getattr(pm.hook, hook_name).get_hookimpls()))  # pluggy lists the latest first
    impls.sort(key=lambda impl: not is_builtin(impl.plugin_name))  # stable: registration order within each

    def caller(impl: Any) -> Callable[..., Any]:
        return lambda **kwargs: impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})

    return [(impl.plugin_name, caller(impl)) for impl in impls]


@dataclass(frozen=True)
class Registration:
    """One thing a plugin registered through a ``register``-style hook: its name, the object, and the plugin."""

    name: str
    value: Any
    plugin: str


def registrations(hook_name: str, key: Callable[[Any], str] = lambda obj: obj.name) -> list[Registration]:
    """Everything registered through a ``register``-style hook, built-ins first, duplicates included.

    ``register(obj)`` files ``obj`` under ``key(obj)``; ``register(name, obj, **options)`` files
    ``(obj, options)`` under ``name``.
    """
    found: list[Registration] = []
    for plugin_name, call in implementations(hook_name):

        def register(obj: Any, *args: Any, _plugin: str = plugin_name, **kwargs: Any) -> None:
            if args:
                found.append(Registration(str(obj), (args[0], kwargs), _plugin))
            else:
                found.append(Registration(key(obj), obj, _plugin))

        call(register=register)
    return found


def collect(hook_name: str, key: Callable[[Any], str] = lambda obj: obj.name) -> dict[str, Any]:
    """Call a ``register``-style hook and return ``{name: obj}`` (see :func:`registrations`), built-ins first.

    A second registration of a name is refused with a :class:`PluginError` naming both plugins: a
    third-party plugin replaces a built-in only by unregistering it, never silently.
    """
    found: dict[str, Registration] = {}
    for reg in registrations(hook_name, key):
        if reg.name in found:
            raise PluginError(
                f"plugin {reg.plugin!r} registers {reg.name!r}, already registered by {found[reg.name].plugin!r}"
            )
        found[reg.name] = reg
    return {name: reg.value for name, reg in found.items()}
