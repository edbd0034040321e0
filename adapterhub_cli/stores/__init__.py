"""Stores: where adapters and bases live besides local folders (the Hugging Face Hub, a local registry).

:func:`open_base` turns a base reference (a folder, or a store ref such as ``org/name@rev``) into a
:class:`~adapterhub_cli.artifact.checkpoint.BaseView`; the layers below read bases only through such views.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_cli.artifact import checkpoint
from adapterhub_cli.artifact.ref import is_hub_ref


if TYPE_CHECKING:
    from adapterhub_cli.artifact.checkpoint import BaseView


def open_base(source: str | Path, *, token: str | None = None) -> BaseView:
    """A view of a base checkpoint: a local folder or file, or a store ref read without downloading weights.

    Raises:
        AdapterNotFoundError, InvalidAdapterError, CorruptFileError: see :func:`checkpoint.open_base`.
        HubError: a Hub ref that cannot be read.
    """
    if is_hub_ref(source):
        from adapterhub_cli.stores.hf.remote import open_remote_base

        return open_remote_base(str(source), token=token)
    return checkpoint.open_base(source)
