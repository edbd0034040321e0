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


@dataclass
class Provenance:
    """THE provenance model: where an artifact came from and what produced it.

    ``source`` and ``sha256`` say where this copy was read from (a folder, ``hf://org/name@<commit>``) and the
    digest of its tensors; ``tool``, ``operation``, ``parameters`` and ``inputs`` are what the writer recorded
    (empty for an adapter this tool did not write). :meth:`record` is the JSON stored in the safetensors metadata
    under :data:`PROVENANCE_KEY`; :meth:`from_metadata` reads it back.
    """

    source: str
    sha256: str | None = None
    operation: str | None = None
    inputs: list[dict[str, str | None]] = field(default_factory=list)
    tool: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_output(
        cls, operation: str, parameters: dict[str, Any], inputs: list[Adapter], *, source: str = ""
    ) -> Provenance:
        """The provenance of an output this tool is about to write, with each input's source and sha256."""
        return cls(
            source=source,
            tool=tool_version(),
            operation=operation,
            parameters=dict(parameters),
            inputs=[input_record(a) for a in inputs],
        )

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], *, source: str) -> Provenance:
        """The provenance a file's safetensors metadata records (nothing recorded, or unreadable: only ``source``)."""
        doc = _recorded(metadata)
        if doc is None:
            return cls(source=source)
        inputs = doc.get("inputs")
        params = doc.get("parameters")
        return cls(
            source=source,
            tool=str(doc["tool"]) if isinstance(doc.get("tool"), str) else None,
            operation=str(doc["operation"]) if isinstance(doc.get("operation"), str) else None,
            parameters=params if isinstance(params, dict) else {},
            inputs=[i for i in inputs if isinstance(i, dict)] if isinstance(inputs, list) else [],
        )

    def record(self) -> dict[str, Any]:
        """The JSON object writers store: ``{"tool", "operation", "parameters", "inputs"}``."""
        return {"tool": self.tool, "operation": self.operation, "parameters": self.parameters, "inputs": self.inputs}


def provenance(operation: str, parameters: dict[str, Any], inputs: list[Adapter]) -> dict[str, Any]:
    """The JSON record of :meth:`Provenance.of_output`, for writers that take the record."""
    return Provenance.of_output(operation, parameters, inputs).record()


def _recorded(metadata: dict[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, a number too long, or nested too deeply
        return None
    return doc if isinstance(doc, dict) else None


def read_provenance(adapter: Adapter) -> dict[str, Any] | None:
    """The provenance record an adapter written by this tool carries (as stored), or None."""
    return _recorded(adapter.metadata)
