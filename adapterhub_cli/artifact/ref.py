"""Adapter references: a local path or a Hub repo with an optional revision, and semantic versions.

    AdapterRef.parse("org/name@v1.2.0")   # a tag
    AdapterRef.parse("org/name@latest")   # the highest semver tag
    AdapterRef.parse("org/name@^1.2")     # the highest tag in [1.2.0, 2.0.0)
    AdapterRef.parse("hf://org/name@main")
    AdapterRef.parse("./my-lora")         # a local folder or file

A string that names an existing local path is always local; ``hf://`` forces a Hub ref.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from pathlib import Path

from adapterhub_cli.errors import UsageError


HF_SCHEME = "hf://"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_HF_REPO_ID = re.compile(rf"^(?:{_NAME}/)?{_NAME}$")  # hf:// also accepts a legacy one-part id ("gpt2")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SEMVER = re.compile(
    r"^v?(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?$"
)
_PARTIAL = re.compile(r"^(?P<op>\^|~|=)?v?(?P<major>\d+)(?:\.(?P<minor>\d+))?(?:\.(?P<patch>\d+))?$")


@total_ordering
@dataclass(frozen=True)
class Version:
    """A semantic version ``MAJOR.MINOR.PATCH[-PRERELEASE]``; a prerelease sorts before its release."""

    major: int
    minor: int
    patch: int
    pre: str | None = None

    @classmethod
    def parse(cls, text: str) -> Version | None:
        """The version ``text`` spells (a leading ``v`` is allowed), or None when it is not semver."""
        m = _SEMVER.match(text.strip())
        if m is None:
            return None
        return cls(int(m["major"]), int(m["minor"]), int(m["patch"]), m["pre"])

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        pre: tuple[tuple[int, int | str], ...] = ()
        if self.pre:
            pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.pre.split("."))
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + (f"-{self.pre}" if self.pre else "")

    @property
    def tag(self) -> str:
        """The git tag this tool gives the version: ``v1.2.0``."""
        return f"v{self}"


def require_version(text: str) -> Version:
    """Parse a version to publish, or raise :class:`UsageError` naming the expected form."""
    v = Version.parse(text)
    if v is None:
        raise UsageError(f"{text!r} is not a semantic version", hint="use MAJOR.MINOR.PATCH, e.g. 1.3.0")
    return v


def version_range(spec: str) -> tuple[Version, Version] | None:
    """``[low, high)`` for a range spec: ``^1.2`` (>=1.2.0 <2.0.0; ``^0.2`` stays below 0.3.0), ``~1.2``
    (>=1.2.0 <1.3.0), or a partial version ``1`` / ``1.2`` (any version starting so). None otherwise."""
    m = _PARTIAL.match(spec.strip())
    if m is None or (m["op"] in (None, "=") and m["patch"] is not None):
        return None  # a full version is an exact match, not a range
    major, minor, patch = int(m["major"]), int(m["minor"] or 0), int(m["patch"] or 0)
    low = Version(major, minor, patch)
    if m["op"] == "^":
        if major > 0 or m["minor"] is None:
            high = Version(major + 1, 0, 0)
        elif minor > 0 or m["patch"] is None:
            high = Version(0, minor + 1, 0)
        else:
            high = Version(0, 0, patch + 1)
    elif m["op"] == "~" and m["minor"] is not None:
        high = Version(major, minor + 1, 0)
    elif m["minor"] is None:
        high = Version(major + 1, 0, 0)
    else:
        high = Version(major, minor + 1, 0)
    return low, high


def in_range(v: Version, bounds: tuple[Version, Version]) -> bool:
    """Whether ``v`` lies in ``[low, high)``; prereleases match only when the range starts at one."""
    low, high = bounds
    return low <= v < high and (v.pre is None or low.pre is not None)


@dataclass(frozen=True)
class AdapterRef:
    """Where an adapter (or a base model) lives: a local ``path``, or a Hub ``repo_id`` at ``revision``.

    ``revision`` is kept as written: a tag (``v1.2.0``), a bare version (``1.2.0``), ``latest``, a range
    (``^1.2``, ``~1.2``, ``1``), a branch or a 40-hex commit; None means the default branch.
    ``str(ref)`` gives back the text it was parsed from (``hf://`` included when it was given).
    """

    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    scheme: bool = False

    @classmethod
    def parse(cls, text: str | Path) -> AdapterRef:
        """Parse a path or a Hub ref; an existing local path wins over a Hub ref of the same spelling.

        Raises:
            UsageError: an ``hf://`` ref whose repo id or revision is malformed.
        """
        if isinstance(text, Path):
            return cls(path=str(text))
        raw = text.strip()
        if raw.startswith(HF_SCHEME):
            repo, rev = _split(raw[len(HF_SCHEME) :])
            if not _HF_REPO_ID.match(repo) or rev == "":
                raise UsageError(f"{text!r} is not a Hub ref", hint="write hf://ORG/NAME[@REVISION]")
            return cls(repo_id=repo, revision=rev, scheme=True)
        if raw.startswith(("./", "../", "/", "~", ".\\")) or Path(raw).expanduser().exists():
            return cls(path=raw)
        repo, rev = _split(raw)
        if _REPO_ID.match(repo) and rev != "":
            return cls(repo_id=repo, revision=rev)
        return cls(path=raw)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def kind(self) -> str:
        """``local``, ``default`` (no revision), ``commit``, ``latest``, ``range``, ``version`` or ``name``
        (a tag or branch spelled out)."""
        if not self.is_hub:
            return "local"
        rev = self.revision
        if rev is None:
            return "default"
        if _COMMIT.match(rev):
            return "commit"
        if rev == "latest":
            return "latest"
        if Version.parse(rev) is not None:
            return "version"
        if version_range(rev) is not None:
            return "range"
        return "name"

    @property
    def display(self) -> str:
        """``org/name@rev`` without the scheme (what a user would type)."""
        if not self.is_hub:
            return str(self.path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)

    def __str__(self) -> str:
        if not self.is_hub:
            return str(self.path)
        return (HF_SCHEME if self.scheme else "") + self.display


def is_hub_ref(source: object) -> bool:
    """Whether ``source`` is a string naming a Hub repo rather than an existing local path."""
    if isinstance(source, AdapterRef):
        return source.is_hub
    if not isinstance(source, str):
        return False
    try:
        return AdapterRef.parse(source).is_hub
    except UsageError:
        return True  # a malformed hf:// ref: let the Hub code report it


def _split(text: str) -> tuple[str, str | None]:
    repo, sep, rev = text.partition("@")
    return repo.rstrip("/"), (rev if sep else None)
