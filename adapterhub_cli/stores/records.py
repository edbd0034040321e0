"""What stores answer: a resolved version, its files, published versions, push and pull results."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.ref import tag_version


@dataclass(frozen=True)
class StoreFile:
    """A file of a published version: its name (relative, ``/``-separated), size and sha256 when the store
    knows them (the Hub knows the sha256 of LFS files only; ``blob_id`` is then its git blob sha1)."""

    name: str
    size: int | None = None
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A ref resolved to one immutable version of a repo in a store.

    Attributes:
        store: the store's name (``hf``, ``file``, a plugin's).
        repo_id: the repo inside the store (``org/name``).
        requested: the revision as written (``^1.2``, ``v1.2.0``, ``main``), None for the default.
        commit: the immutable id of the version: a git commit on the Hub, the manifest's sha256 in a
            local registry. The same id always names the same bytes.
        tag: the version tag the ref was resolved through (``v1.2.0``), None when not through a version.
        files: every file of the version, by name.
        root: what is written before ``repo_id`` in this store's refs: ``""`` for the Hub's bare
            ``org/name``, ``file:///srv/adapters/`` for a local registry, ``s3://bucket/`` for a plugin's.
        branch: the branch the ref was resolved through (``main``), None when not through a branch.
        note: how a ref that named no exact version was resolved, in words: ``the latest release (no version
            was given)``, ``the default branch main (no version tags)``; None for an exact ref.
    """

    store: str
    repo_id: str
    requested: str | None
    commit: str
    tag: str | None
    files: Mapping[str, StoreFile]
    root: str = ""
    branch: str | None = None
    note: str | None = None

    @property
    def pinned(self) -> str:
        """``repo_id@<immutable id>`` (without the store's root)."""
        return f"{self.repo_id}@{self.commit}"

    @property
    def label(self) -> str:
        """What a user reads: ``org/name@v1.2.0`` when found through a tag (tags are never moved), else
        ``org/name@<id>``, prefixed by the store's root when it has one."""
        return f"{self.root}{self.repo_id}@{self.tag or self.commit}"

    @property
    def uri(self) -> str:
        """The ref that names exactly this version in any later run: ``hf://org/name@<commit>``,
        ``file:///srv/adapters/org/name@<id>`` (what provenance records)."""
        return f"{self.root or self.store + '://'}{self.repo_id}@{self.commit}"


@dataclass(frozen=True)
class VersionInfo:
    """One published version (tag) of a repo: its tag, semver (None for other tags), immutable id, date
    and message; ``seen_at`` is set when the row comes from a cached listing (offline mode), not the store."""

    tag: str
    version: str | None
    commit: str
    date: str | None
    title: str
    message: str
    #: None when listed by the store just now; in offline mode, when the cached listing was seen online
    seen_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PushResult:
    """What a push published: ``ref`` (``org/name@v1.3.0``) names it from now on."""

    repo_id: str
    version: str
    tag: str
    commit: str
    ref: str
    url: str
    files: list[str]
    validated_against: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    """Where a pull put the files (a folder ``out``, or the store's own verified copy) and what it pinned: the
    ``commit`` (immutable id) always, the ``tag`` or ``branch`` it was found through, and a ``note`` saying how a
    ref without an exact version was resolved (:attr:`Resolved.note`)."""

    path: Path
    repo_id: str
    requested: str | None
    commit: str
    tag: str | None
    files: dict[str, str]  # name -> sha256 of the local file
    root: str = field(default="", repr=False)
    branch: str | None = None
    note: str | None = None

    @property
    def pinned(self) -> str:
        return f"{self.root}{self.repo_id}@{self.commit}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d["path"] = str(self.path)
        return d


def resolution_note(
    kind: str, rev: str | None, tag: str | None, branch: str | None, tags: Iterable[str]
) -> str | None:
    """How a ref that named no exact version was resolved, in words (None for an exact tag, branch or commit):
    THE wording of :attr:`Resolved.note` for every store. ``tags``: the published tags."""
    if kind == "default" and tag is not None:
        return f"the latest release {tag} (no version was given)"
    if kind == "default":
        pre = sorted(t for t in tags if tag_version(t) is not None)
        why = f"no release tags, only prereleases: {', '.join(pre)}" if pre else "no version tags"
        return f"the default branch{f' {branch}' if branch else ''} ({why})"
    if kind == "latest":
        return f"the latest release {tag} (prereleases excluded)"
    if kind == "range":
        return f"the highest release in {rev}: {tag}"
    return None
