"""What a format plugin provides."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter


@runtime_checkable
class AdapterFormat(Protocol):
    """A file layout that can be read into an :class:`Adapter`.

    ``sniff`` must be cheap (file names, a header at most). ``read`` reads config and headers and leaves
    tensors to load lazily. A format that can also write defines ``write`` (see :class:`WritableFormat`);
    ``adapters convert --to`` offers exactly the formats that do.
    """

    name: str
    description: str

    def sniff(self, path: Path) -> bool: ...

    def read(self, path: Path) -> Adapter: ...


@runtime_checkable
class WritableFormat(AdapterFormat, Protocol):
    """A format that can also write an :class:`Adapter`.

    ``write(adapter, path, *, overwrite=False, provenance=None, base=None) -> Path`` writes ``adapter`` at
    ``path`` atomically (nothing half-written; an existing ``path`` only with ``overwrite``) and returns what
    it wrote. Factors should keep their bytes and dtypes. ``provenance`` (a JSON-able dict: operation,
    parameters, inputs) belongs in the output's metadata; ``base`` is the base checkpoint the user named,
    for layouts whose names depend on it. A writer may leave out the keywords it has no use for: the host
    passes only those the signature accepts. A user mistake (an adapter the layout cannot hold, a wrong
    file name) raises an :class:`~adapterhub_cli.errors.AdaptersError`, never a bare exception.
    """

    def write(self, adapter: Adapter, path: Path, **options: Any) -> Path: ...
