"""What a format plugin provides."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter


@runtime_checkable
class AdapterFormat(Protocol):
    """A file layout that can be read into an :class:`Adapter`.

    ``sniff`` must be cheap (file names, a header at most). ``read`` reads config and headers and leaves
    tensors to load lazily. A format that can also write defines ``write(adapter, path)``.
    """

    name: str
    description: str

    def sniff(self, path: Path) -> bool: ...

    def read(self, path: Path) -> Adapter: ...
