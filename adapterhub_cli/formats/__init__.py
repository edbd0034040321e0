"""Adapter formats, registered through the ``adapters_register_formats`` hook.

Adding a format is one module (a class with ``name``, ``description``, ``sniff``, ``read`` and, to be a
``convert --to`` target, ``write``; see :mod:`adapterhub_cli.formats.base`) and one ``register(...)`` call in
an ``adapters_register_formats`` hook: in :mod:`adapterhub_cli.formats.builtin` for a built-in, in a plugin
for everything else.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.errors import AdapterNotFoundError, UnknownFormatError
from adapterhub_cli.formats.base import AdapterFormat, WritableFormat


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter


def get_formats() -> dict[str, AdapterFormat]:
    """All registered formats by name, built-ins first."""
    from adapterhub_cli.plugins.manager import collect

    return collect("adapters_register_formats")


def writable_formats() -> dict[str, WritableFormat]:
    """The registered formats that can write, by name, built-ins first."""
    return {name: fmt for name, fmt in get_formats().items() if callable(getattr(fmt, "write", None))}  # type: ignore[misc]


def get_format(name: str) -> AdapterFormat:
    """The format called ``name``; an unknown name raises an error listing the known ones."""
    formats = get_formats()
    if name not in formats:
        raise UnknownFormatError(f"unknown format {name!r}; known formats: {', '.join(sorted(formats))}")
    return formats[name]


def get_writer(name: str) -> WritableFormat:
    """The format called ``name``, which must be able to write; otherwise the error lists those that can."""
    formats = get_formats()
    writers = writable_formats()
    if name not in writers:
        what = "can read but not write" if name in formats else "is not a known format"
        raise UnknownFormatError(
            f"{name!r} {what}; formats that can write: {', '.join(writers)}",
            hint="a plugin can add one through adapters_register_formats (`adapters plugins` lists them)",
        )
    return writers[name]


def write_adapter(fmt: WritableFormat, adapter: Adapter, path: Path, **options: Any) -> Path:
    """Call ``fmt.write(adapter, path, ...)`` with those of ``options`` that are not None and that the writer's
    signature accepts (a writer leaves out the keywords it has no use for)."""
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(fmt.write).parameters
    except (TypeError, ValueError):  # a builtin or C callable: pass everything
        params = {}
    takes_all = not params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in options.items() if v is not None and (takes_all or k in params)}
    written = fmt.write(adapter, path, **accepted)
    return Path(written) if written is not None else path


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


__all__ = [
    "AdapterFormat",
    "WritableFormat",
    "detect_format",
    "get_format",
    "get_formats",
    "get_writer",
    "writable_formats",
    "write_adapter",
]
