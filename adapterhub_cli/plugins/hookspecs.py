"""Hook specifications of the plugin layer (docstrings only).

A plugin is a module or object with ``@hookimpl`` functions named like the specs below, made known
through the ``adapterhub_cli`` entry-point group::

    [project.entry-points.adapterhub_cli]
    my_plugin = "my_package.adapters_plugin"

Hooks are called with keyword arguments; an implementation may accept fewer arguments than the spec.
The product's own formats, combine methods, stores and commands use these same hooks:
``adapterhub_cli.formats.builtin``, ``adapterhub_cli.ops.builtin_methods``, ``adapterhub_cli.stores.builtin``
(listed in ``adapterhub_cli.plugins.manager.BUILTIN_PLUGINS``) and ``adapterhub_cli.cli.commands`` (registered by
``adapterhub_cli.cli.main.build_cli``). A name registered twice is refused with a ``PluginError``.
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

    ``fmt`` has ``name: str``, ``description: str``, ``sniff(path) -> bool`` and ``read(path) -> Adapter``, and
    optionally ``write(adapter, path, *, overwrite=False, provenance=None, base=None) -> Path``, which makes it an
    ``adapters convert --to`` target (see :mod:`adapterhub_cli.formats.base`).
    """


@hookspec
def adapters_register_methods(register: Callable[..., None]) -> None:
    """Register combine methods: ``register(name, fn, description="...", reference="https://...")``.

    ``fn(factors, weights, *, rank=None, density=..., generator=..., alpha=...)`` is called once per module with
    the inputs' ``lora_ops.LoraFactors`` and weights, and returns the combined ``LoraFactors`` (or a
    ``CombinedFactors`` with the compression error). It declares only the keywords it uses; those are its
    options, and ``rank`` / ``density`` without a default are required. See :mod:`adapterhub_cli.ops.methods`.
    """


@hookspec
def adapters_register_commands(cli: Any) -> None:
    """Add click commands to the root ``adapters`` group: ``cli.add_command(cmd)`` or ``@cli.command()``.

    The built-in commands are added first; a plugin command whose name is taken is ignored with a warning.
    """


@hookspec
def adapters_register_stores(register: Callable[..., None]) -> None:
    """Register adapter stores (where adapters and bases are published and read by ref): ``register(store)``.

    ``store`` is an instance of :class:`adapterhub_cli.stores.base.Store`: its ``name`` is also the scheme of
    its refs (``name://...``), ``handles(ref)`` says which refs it takes, and it implements ``resolve``,
    ``versions``, ``read_range``, ``fetch`` and ``publish``; opening adapters and bases, push and pull come
    from the base class. Every command and API function that takes an adapter or a base ref then accepts the
    store's refs. The built-in stores (the Hugging Face Hub, the local ``file://`` registry) register here too.
    """
