"""The hook implementations: what this plugin registers with adapterhub-cli."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterhub_cli import hookimpl
from adapterhub_example_plugin.histogram import rank_histogram
from adapterhub_example_plugin.mean import REFERENCE, mean
from adapterhub_example_plugin.onefile import OneFileFormat
from adapterhub_example_plugin.zipstore import ZipStore


@hookimpl
def adapters_register_formats(register: Callable[[Any], None]) -> None:
    register(OneFileFormat())


@hookimpl
def adapters_register_methods(register: Callable[..., None]) -> None:
    register("mean", mean, description="weighted mean of the updates (example plugin)", reference=REFERENCE)


@hookimpl
def adapters_register_commands(cli: Any) -> None:
    cli.add_command(rank_histogram)


@hookimpl
def adapters_register_stores(register: Callable[..., None]) -> None:
    register(ZipStore())
