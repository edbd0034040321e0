"""Built-in formats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterhub_cli.formats.diffusers import DiffusersFormat
from adapterhub_cli.formats.kohya import KohyaFormat
from adapterhub_cli.formats.lycoris import LycorisFormat
from adapterhub_cli.formats.peft import PeftFormat
from adapterhub_cli.plugins.hookspecs import hookimpl


@hookimpl
def adapters_register_formats(register: Callable[[Any], None]) -> None:
    register(PeftFormat())
    register(KohyaFormat())
    register(DiffusersFormat())
    register(LycorisFormat())
