"""Adapters and base checkpoints of any store, opened from config files and safetensors headers only."""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter
    from adapterhub_cli.artifact.checkpoint import BaseView
    from adapterhub_cli.artifact.safetensors import SafetensorsHeader
    from adapterhub_cli.stores.base import Resolved, Store


def header_by_range(store: Store, resolved: Resolved, name: str) -> SafetensorsHeader:
    raise NotImplementedError  # lands with the Hub store's split


def open_store_adapter(store: Store, resolved: Resolved, *, allow_pickle: bool = False) -> Adapter:
    raise NotImplementedError  # lands with the Hub store's split


def open_store_base(store: Store, resolved: Resolved) -> BaseView:
    raise NotImplementedError  # lands with the Hub store's split
