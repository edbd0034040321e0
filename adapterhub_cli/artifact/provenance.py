"""Provenance: what produced an artifact, from which inputs (with their sha256), with which tool version.

Writers store it as JSON under ``adapterhub.provenance`` in the safetensors metadata; readers get it back
as a :class:`Provenance`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.files import sha256_file


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter
    from adapterhub_cli.artifact.checkpoint import BaseView


PROVENANCE_KEY = "adapterhub.provenance"


def tool_version() -> str:
    from adapterhub_cli._version import __version__

    return f"adapterhub-cli {__version__}"


def input_record(adapter: Adapter) -> dict[str, str | None]:
    """What an output's provenance says about one input: where it came from and the sha256 of its tensors."""
    f = adapter.tensor_file
    return {"source": str(adapter.path), "sha256": sha256_file(f) if f is not None else None}


def base_record(view: BaseView, source: str | None = None) -> dict[str, str | None]:
    """What a merge's (or unmerge's) provenance says about its base checkpoint: cheap, and honest about it.

    The weights themselves are not hashed (that reads the whole base, as long again as the merge), so ``sha256``
    is None. Recorded instead: ``config_sha256``, the sha256 of the parsed ``config.json`` as canonical JSON (keys
    sorted, ``_name_or_path`` left out: it names the copy, not the model), and ``tensors_sha256``, the sha256 of
    the canonical JSON of the tensor table (every stored tensor's name, dtype and shape, in name order): it
    identifies the architecture and layout, not the values. ``source`` is how the base was named (a store ref such
    as ``org/name@v1.0.0``, which pins a version, or the folder).
    """
    config = {k: v for k, v in view.config.items() if k != "_name_or_path"}
    table = {name: [info.dtype, list(info.shape)] for name, info in sorted(view.tensors.items())}
    return {
        "source": str(source if source is not None else view.path),
        "role": "base",
        "sha256": None,
        "config_sha256": _digest(config),
        "tensors_sha256": _digest(table),
    }


def merge_provenance(
    operation: str, parameters: dict[str, Any], base: dict[str, str | None], adapters: list[Adapter]
) -> dict[str, Any]:
    """The record a merge / unmerge stores: the base (:func:`base_record`) then each adapter (its source and the
    sha256 of its tensor file, ``role: adapter``) in the order of ``parameters["weights"]``."""
    inputs = [base] + [{**input_record(a), "role": "adapter"} for a in adapters]
    return Provenance(
        source="", tool=tool_version(), operation=operation, parameters=dict(parameters), inputs=inputs
    ).record()


def checkpoint_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The provenance record a checkpoint folder written by ``merge`` / ``unmerge`` carries (in the metadata of
    its first weight file), or None: a checkpoint this tool did not write, or not a checkpoint."""
    from adapterhub_cli.artifact.checkpoint import find_layout, read_index
    from adapterhub_cli.artifact.safetensors import read_header
    from adapterhub_cli.errors import AdaptersError

    folder = Path(folder)
    try:
        layout = find_layout([p.name for p in folder.iterdir() if p.is_file()])
        if layout is None:
            return None
        first = sorted(set(read_index(folder / layout.index).values()))[0] if layout.sharded else layout.single
        return _recorded(read_header(folder / first).metadata)
    except (OSError, AdaptersError, IndexError):
        return None


def _digest(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


#: the longest provenance record read back (a merge of thousands of adapters fits): the record goes into cards
_MAX_RECORD = 1 << 20


def _recorded(metadata: dict[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(PROVENANCE_KEY)
    if not isinstance(raw, str) or len(raw) > _MAX_RECORD:  # a file someone else wrote: not ours to repeat
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, a number too long, or nested too deeply
        return None
    return doc if isinstance(doc, dict) else None


def read_provenance(adapter: Adapter) -> dict[str, Any] | None:
    """The provenance record an adapter written by this tool carries (as stored), or None."""
    return _recorded(adapter.metadata)
