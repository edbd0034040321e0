"""Stores: where adapters and bases live besides local folders (the Hugging Face Hub, a local registry, plugins').

:func:`open_base` turns a base reference (a folder, or a store ref such as ``org/name@rev`` or
``file:///srv/adapters/org/name@1.2.0``) into a :class:`~adapterhub_cli.artifact.checkpoint.BaseView`;
:func:`open_adapter` does the same for adapters. The layers below read bases only through such views.
The :class:`~adapterhub_cli.stores.base.Store` interface and the registry are in :mod:`.base`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact import checkpoint
from adapterhub_cli.stores.registry import find_store, get_store, stores


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter
    from adapterhub_cli.artifact.checkpoint import BaseView
    from adapterhub_cli.artifact.ref import AdapterRef

__all__ = ["find_store", "get_store", "open_base", "open_store_adapter", "stores"]


def open_base(source: str | Path | AdapterRef, **options: Any) -> BaseView:
    """A view of a base checkpoint: a local folder or file, or any store's ref read without downloading weights.

    ``options`` go to the store (the Hub takes ``api`` and ``token``).

    Raises:
        AdapterNotFoundError, InvalidAdapterError, CorruptFileError: see :func:`checkpoint.open_base`.
        UsageError: an unknown store scheme. HubError: a store ref that cannot be read.
    """
    store = find_store(source)
    if store is not None:
        return store.configured(**options).open_base(str(source))
    return checkpoint.open_base(str(source) if not isinstance(source, Path) else source)


def open_store_adapter(
    source: str | Path | AdapterRef, *, allow_pickle: bool = False, **options: Any
) -> Adapter | None:
    """The adapter a store ref names (config and headers only), or None when ``source`` is a local path."""
    store = find_store(source)
    if store is None:
        return None
    return store.configured(**options).open_adapter(str(source), allow_pickle=allow_pickle)
