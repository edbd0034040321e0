"""The store registry, filled through the ``adapters_register_stores`` hook (built-ins and plugins alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterhub_cli.artifact.ref import AdapterRef, ref_scheme
from adapterhub_cli.errors import PluginError, UsageError


if TYPE_CHECKING:
    from adapterhub_cli.stores.base import Store

_PRIMITIVES = ("handles", "resolve", "versions", "read_range", "fetch", "publish", "open_adapter", "open_base")


def stores() -> dict[str, Store]:
    """Every registered store by name, in registration order (built-ins first), collected through the
    ``adapters_register_stores`` hook of the built-in and entry-point plugins (and of plugins registered at
    run time, so nothing is cached)."""
    from adapterhub_cli.plugins.manager import collect

    found = collect("adapters_register_stores")
    for name, store in found.items():
        if not all(callable(getattr(store, m, None)) for m in _PRIMITIVES):
            raise PluginError(f"store {name!r} is a {type(store).__name__}, not an adapterhub_cli Store")
    return found


def find_store(ref: object) -> Store | None:
    """The store whose :meth:`Store.handles` accepts ``ref``, or None for a local path.

    Raises:
        UsageError: ``ref`` has a scheme (``x://``) that no registered store handles; the message lists them.
    """
    if isinstance(ref, AdapterRef):
        ref = str(ref)
    if not isinstance(ref, str):
        return None
    for store in stores().values():
        if store.handles(ref):
            return store
    scheme = ref_scheme(ref)
    if scheme is not None:
        registered = stores().values()
        raise UsageError(
            f"no store handles {scheme}:// refs ({ref}); known stores: "
            + ", ".join(f"{s.name}://" for s in registered),
            hint="; ".join(f"{s.name}: {s.description}" for s in registered)
            + ". A plugin can add a store through the adapters_register_stores hook",
        )
    return None


def get_store(ref: object) -> Store:
    """The store for ``ref``.

    Raises:
        UsageError: no store handles ``ref`` (an unknown scheme, or a local path); the message lists the known
            stores.
    """
    store = find_store(ref)
    if store is None:
        registered = stores().values()
        raise UsageError(
            f"{ref} is not a store ref; known stores: " + ", ".join(f"{s.name}://" for s in registered),
            hint="; ".join(f"{s.name}: {s.description}" for s in registered),
        )
    return store
