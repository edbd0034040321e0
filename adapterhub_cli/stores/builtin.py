"""The built-in stores, registered through the same hook as a plugin's: the Hugging Face Hub and the local
directory registry."""

from __future__ import annotations

from collections.abc import Callable

from adapterhub_cli.plugins.hookspecs import hookimpl


@hookimpl
def adapters_register_stores(register: Callable[..., None]) -> None:
    from adapterhub_cli.stores.hf.store import HfStore
    from adapterhub_cli.stores.local import LocalStore

    register(HfStore())
    register(LocalStore())
