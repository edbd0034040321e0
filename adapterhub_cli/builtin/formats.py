"""Built-in formats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterhub_cli.formats.peft import PeftFormat
from adapterhub_cli.hookspecs import hookimpl


@hookimpl
def adapters_register_formats(register: Callable[[Any], None]) -> None:
    register(PeftFormat())
