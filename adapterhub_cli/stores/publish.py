"""Generic push and pull over the :class:`~adapterhub_cli.stores.base.Store` primitives."""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from pathlib import Path

    from adapterhub_cli.artifact.ref import AdapterRef
    from adapterhub_cli.stores.base import PullResult, PushResult, Store


def push_folder(
    store: Store,
    source: str | Path,
    ref: str,
    *,
    version: str,
    message: str | None = None,
    force: bool = False,
    base_model: str | None = None,
) -> PushResult:
    raise NotImplementedError  # lands with the Hub store's split


def pull_version(
    store: Store,
    ref: str | AdapterRef,
    *,
    out: str | Path | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> PullResult:
    raise NotImplementedError  # lands with the Hub store's split
