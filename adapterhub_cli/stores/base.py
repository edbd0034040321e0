"""The :class:`Store` interface and the store registry.

A store is a place adapters and base checkpoints are published to and read from by ref: the Hugging Face
Hub (``org/name@v1.2.0``, ``hf://org/name@main``), a local directory registry
(``file:///srv/adapters/org/name@^1.2``), or a third-party store a plugin registers through the
``adapters_register_stores`` hook (``s3://...``). A plugin store implements the primitive methods only
(``handles``, ``resolve``, ``versions``, ``read_range``, ``fetch``, ``publish``); opening an adapter or a base
without downloading weights, pushing with validation and a card, and pulling into a folder come from the
generic implementations here.

A version is immutable: once published under a version number it is never moved or rewritten, and
:meth:`Store.resolve` pins a ref to that version's immutable id (a git commit on the Hub, a content hash in
a local registry).

    store = get_store("file:///srv/adapters/acme/lora@^1.2")
    resolved = store.resolve("file:///srv/adapters/acme/lora@^1.2")
    adapter = store.open_adapter(resolved)         # config + safetensors header, no weights read
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.ref import AdapterRef, Version
from adapterhub_cli.stores.records import PullResult, PushResult, Resolved, StoreFile, VersionInfo
from adapterhub_cli.stores.registry import find_store, get_store, stores


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter
    from adapterhub_cli.artifact.checkpoint import BaseView
    from adapterhub_cli.artifact.safetensors import SafetensorsHeader

__all__ = [
    "PullResult",
    "PushResult",
    "Resolved",
    "Store",
    "StoreFile",
    "VersionInfo",
    "find_store",
    "get_store",
    "stores",
]


# ------------------------------------------------------------------------------------------ the interface


class Store(ABC):
    """Where adapters and bases are published and read by ref.

    Subclasses set ``name`` (also the URI scheme its refs may use: ``name://...``) and ``description``, and
    implement the primitives: :meth:`handles`, :meth:`resolve`, :meth:`versions`, :meth:`read_range`,
    :meth:`fetch` and :meth:`publish`. The rest has generic implementations built on those, which a store
    may override with faster or richer ones (the Hub reads headers with its own call, and a push updates the
    card already on the repo).

    Every method raises :class:`~adapterhub_cli.errors.AdaptersError` subclasses for what a user can cause
    (a missing repo or version: ``StoreNotFoundError``; a version that exists: ``VersionConflictError``; a
    file whose bytes disagree with its recorded sha256: ``CorruptFileError``), never a bare exception.
    """

    #: the store's registry name, also the scheme of its refs (``hf`` for ``hf://``)
    name: str = ""
    #: one line for ``adapters plugins`` and error messages
    description: str = ""

    def configured(self, **options: Any) -> Store:
        """This store bound to per-call options (the Hub takes ``api`` and ``token``); options it does not
        know are ignored. The default ignores them all and returns ``self``."""
        return self

    def where(self, resolved: Resolved) -> Path:
        """The path messages and reports name a version's files under (``adapter.path`` of an opened adapter):
        ``org/name@v1.2.0`` by default (:attr:`Resolved.label`)."""
        return Path(resolved.label)

    # ---------------------------------------------------------------------------------- primitives

    @abstractmethod
    def handles(self, ref: str) -> bool:
        """Whether ``ref`` names a repo of this store. Must be cheap (no I/O beyond the local file system)
        and must answer False for a plain local folder or file, so local paths stay local."""

    @abstractmethod
    def resolve(self, ref: str | AdapterRef) -> Resolved:
        """Pin ``ref`` to one immutable version: an exact version (``1.2.0`` / ``v1.2.0``), ``latest`` (the
        highest release), a range (``^1.2``, ``~1.2``, ``1``; the grammar of
        :func:`adapterhub_cli.artifact.ref.version_range`), an immutable id, a store-specific name (a Hub
        branch), or nothing: the latest release, as ``latest`` (a store with branches, the Hub, takes its default
        branch when the repo has no release). "Latest" has one meaning everywhere:
        :func:`adapterhub_cli.artifact.ref.latest_release`, prereleases excluded. The files listed are exactly
        those of that version; ``note`` says how a ref without an exact version was resolved.

        Raises:
            StoreNotFoundError: no such repo, or no version matching.
        """

    @abstractmethod
    def versions(self, ref: str) -> list[VersionInfo]:
        """The repo's published versions: semver tags newest first, then other tags. Empty when the repo
        exists but holds no version.

        Raises:
            StoreNotFoundError: no such repo.
        """

    @abstractmethod
    def read_range(self, resolved: Resolved, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of file ``name`` of the pinned version from offset ``start`` (fewer only at the
        end of the file), without fetching the whole file: how config-free reads of safetensors headers and
        of single small tensors work."""

    @abstractmethod
    def fetch(self, resolved: Resolved, name: str) -> Path:
        """A local path holding file ``name`` of the pinned version, whose sha256 has been checked against
        the store's record (when the store has one). The path stays valid for the process's lifetime and
        must not be written to; files of one version fetched this way share one folder.

        Raises:
            CorruptFileError: the bytes disagree with the recorded sha256.
        """

    @abstractmethod
    def publish(
        self,
        ref: str,
        files: Mapping[str, Path],
        *,
        version: Version,
        card: str | None,
        message: str | None = None,
        force: bool = False,
    ) -> PushResult:
        """Publish ``files`` (name -> local path) and ``card`` (README.md text, if any) as version
        ``version`` of repo ``ref``, creating the repo when needed.

        Must guarantee: the version appears completely or not at all; an existing version is never moved
        or rewritten (``VersionConflictError``, also for a concurrent publish of the same version that
        won); a version lower than the highest published needs ``force`` (``VersionConflictError``
        otherwise).
        """

    # --------------------------------------------------------------------------- generic, overridable

    def parse(self, ref: str | AdapterRef) -> AdapterRef:
        """``ref`` parsed with the one ref grammar (:class:`~adapterhub_cli.artifact.ref.AdapterRef`)."""
        return ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)

    def read_header(self, resolved: Resolved, name: str) -> SafetensorsHeader:
        """The checked header of safetensors file ``name``, read by two :meth:`read_range` calls."""
        from adapterhub_cli.stores.views import header_by_range

        return header_by_range(self, resolved, name)

    def open_adapter(self, ref: str | AdapterRef | Resolved, *, allow_pickle: bool = False) -> Adapter:
        """An adapter from its config and safetensors header; the weight file is fetched (and verified) on
        the first tensor read. ``adapter.provenance.source`` is the version's :attr:`Resolved.uri`."""
        from adapterhub_cli.stores.views import open_store_adapter

        resolved = ref if isinstance(ref, Resolved) else self.resolve(ref)
        return open_store_adapter(self, resolved, allow_pickle=allow_pickle)

    def open_base(self, ref: str | AdapterRef | Resolved) -> BaseView:
        """A base checkpoint's config and tensor headers (any layout of the checkpoint layout table, single
        file or sharded); shards are fetched one at a time when a merge first reads them, single small
        tensors read by range."""
        from adapterhub_cli.stores.views import open_store_base

        resolved = ref if isinstance(ref, Resolved) else self.resolve(ref)
        return open_store_base(self, resolved)

    def previous_card(self, ref: str) -> str | None:
        """The card (README.md) of the repo's latest version, which a push without a local card updates;
        None by default."""
        return None

    def push(
        self,
        source: str | Path,
        ref: str,
        *,
        version: str,
        message: str | None = None,
        force: bool = False,
        base_model: str | None = None,
    ) -> PushResult:
        """Validate a local adapter (or merged model) folder, card it and :meth:`publish` it as ``version``.

        The adapter is checked alone and against its declared base when that base is reachable (a local
        folder or any store's ref); the card gets the store metadata and the lineage.
        """
        from adapterhub_cli.stores.publish import push_folder

        return push_folder(self, source, ref, version=version, message=message, force=force, base_model=base_model)

    def pull(
        self,
        ref: str | AdapterRef,
        *,
        out: str | Path | None = None,
        allow_pickle: bool = False,
        overwrite: bool = False,
    ) -> PullResult:
        """Resolve ``ref`` and fetch (verified) the files an adapter or a model needs; with ``out``, copy them
        into that folder atomically with a ``.adapters-pull.json`` record of what was pinned; without, the
        result's ``path`` is the folder :meth:`fetch` put them in."""
        from adapterhub_cli.stores.publish import pull_version

        return pull_version(self, ref, out=out, allow_pickle=allow_pickle, overwrite=overwrite)
