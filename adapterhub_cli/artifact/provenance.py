"""Provenance: what produced an artifact, from which inputs (with their sha256), with which tool version.

Writers store it as JSON under ``adapterhub.provenance`` in the safetensors metadata; readers get it back
as a :class:`Provenance`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.files import sha256_file


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter


PROVENANCE_KEY = "adapterhub.provenance"


def tool_version() -> str:
    from adapterhub_cli._version import __version__

    return f"adapterhub-cli {__version__}"


def input_record(adapter: Adapter) -> dict[str, str | None]:
    """What an output's provenance says about one input: where it came from and the sha256 of its tensors."""
    f = adapter.tensor_file
    return {"source": str(adapter.path), "sha256": sha256_file(f) if f is not None else None}


def provenance(operation: str, parameters: dict[str, Any], inputs: list[Adapter]) -> dict[str, Any]:
    return {
        "tool": tool_version(),
        "operation": operation,
        "parameters": parameters,
        "inputs": [input_record(a) for a in inputs],
    }


def read_provenance(adapter: Adapter) -> dict[str, Any] | None:
    """The provenance an adapter written by this tool carries, or None."""
    raw = adapter.metadata.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


@dataclass
class Provenance:
    """Where an adapter came from and what produced it."""

    source: str
    sha256: str | None = None
    operation: str | None = None
    inputs: list[dict[str, str]] = field(default_factory=list)
