"""Hook specifications of the plugin layer (docstrings only).

A plugin is a module or object with ``@hookimpl`` functions named like the specs below, made known
through the ``adapterhub_cli`` entry-point group::

    [project.entry-points.adapterhub_cli]
    my_plugin = "my_package.adapters_plugin"

Hooks are called with keyword arguments; an implementation may accept fewer arguments than the spec.
The built-in formats and commands use these same hooks (see ``adapterhub_cli.builtin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy


hookspec = pluggy.HookspecMarker("adapterhub_cli")
hookimpl = pluggy.HookimplMarker("adapterhub_cli")


@hookspec
def adapters_register_formats(register: Callable[[Any], None]) -> None:
    """Register adapter file formats: call ``register(fmt)`` for each.

    ``fmt`` has ``name: str``, ``description: str``, ``sniff(path) -> bool`` and ``read(path) -> Adapter``,
    and optionally ``write(adapter, path)`` (see :class:`adapterhub_cli.formats.AdapterFormat`).
    """


@hookspec
def adapters_register_methods(register: Callable[..., None]) -> None:
    """Register combine methods: ``register(name, fn, description="...", reference="https://...")``."""


@hookspec
def adapters_register_commands(cli: Any) -> None:
    """Add click commands to the root ``adapters`` group: ``cli.add_command(cmd)`` or ``@cli.command()``."""


@hookspec
def adapters_register_stores(register: Callable[..., None]) -> None:
    """Register adapter stores (where adapters and bases are published and read by ref): ``register(store)``.

    ``store`` is an instance of :class:`adapterhub_cli.stores.base.Store`: its ``name`` is also the scheme of
    its refs (``name://...``), ``handles(ref)`` says which refs it takes, and it implements ``resolve``,
    ``versions``, ``read_range``, ``fetch`` and ``publish``; opening adapters and bases, push and pull come
    from the base class. Every command and API function that takes an adapter or a base ref then accepts the
    store's refs. The built-in stores (the Hugging Face Hub, the local ``file://`` registry) register here too.
    """
