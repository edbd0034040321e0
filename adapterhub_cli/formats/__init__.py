"""Adapter formats, registered through the ``adapters_register_formats`` hook."""

from __future__ import annotations

from pathlib import Path

from adapterhub_cli.errors import AdapterNotFoundError, UnknownFormatError
from adapterhub_cli.formats.base import AdapterFormat


def get_formats() -> dict[str, AdapterFormat]:
    """All registered formats by name, built-ins first."""
    from adapterhub_cli.plugins.manager import collect

    return collect("adapters_register_formats")


def get_format(name: str) -> AdapterFormat:
    """The format called ``name``; an unknown name raises an error listing the known ones."""
    formats = get_formats()
    if name not in formats:
        raise UnknownFormatError(f"unknown format {name!r}; known formats: {', '.join(sorted(formats))}")
    return formats[name]


def detect_format(path: Path) -> AdapterFormat:
    """The format that claims ``path``: plugins are asked before the built-in PEFT format, which is the fallback."""
    if not path.exists():
        raise AdapterNotFoundError(path)
    formats = get_formats()
    for fmt in reversed(list(formats.values())):
        if fmt.sniff(path):
            return fmt
    if path.is_dir() and "peft" in formats:
        return formats["peft"]  # reading it gives the precise error (no adapter_config.json, ...)
    raise UnknownFormatError(
        f"no format can read {path}; known formats: {', '.join(sorted(formats))}",
        hint="a PEFT folder (adapter_config.json + adapter_model.safetensors) is expected",
    )


__all__ = ["AdapterFormat", "detect_format", "get_format", "get_formats"]
