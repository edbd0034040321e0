"""Conversion between LoRA file layouts: any registered format that can write (PEFT folders, kohya sd-scripts
files, diffusers LoRA files, and those plugins add).

The writing is the target format's ``write`` (see :mod:`adapterhub_cli.formats.builtin` for the built-ins);
this module resolves the target, records provenance and reports what was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.preflight import require_valid
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.formats import get_writer, write_adapter


@dataclass
class ConvertResult:
    """The written adapter: where, in which format, how many modules, and what the reader warned about."""

    path: Path
    to: str
    source_format: str
    modules: int
    warnings: list[str] = field(default_factory=list)


def convert_adapter(
    adapter: Adapter, out: str | Path, *, to: str, base: str | Path | None = None, overwrite: bool = False
) -> ConvertResult:
    """Write ``adapter`` at ``out`` in the registered format ``to`` (e.g. a ``peft`` folder, a ``kohya``
    ``.safetensors`` file, a ``diffusers`` folder with ``pytorch_lora_weights.safetensors``).

    Raises:
        UnknownFormatError: ``to`` is not a registered format that can write; the message lists those that can.
    """
    fmt = get_writer(to)
    require_valid(adapter, check_weights=False)  # ranks and scales (NaN alpha); writers refuse NaN tensors
    out = Path(out)
    params: dict[str, Any] = {"to": to}
    if base is not None:
        params["base"] = str(base)
    prov = provenance("convert", params, [adapter])
    written = write_adapter(fmt, adapter, out, base=base, overwrite=overwrite, provenance=prov)
    return ConvertResult(
        path=written,
        to=to,
        source_format=adapter.format,
        modules=len(adapter.modules),
        warnings=list(adapter.warnings),
    )
