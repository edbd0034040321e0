"""Adapter references, the one ref / repo-id grammar: a local path, or a repo in a store with an optional revision;
and semantic versions with their ranges.

    AdapterRef.parse("org/name@v1.2.0")   # a tag on the Hub
    AdapterRef.parse("org/name@latest")   # the highest release tag (prereleases excluded)
    AdapterRef.parse("org/name@^1.2")     # the highest tag in [1.2.0, 2.0.0)
    AdapterRef.parse("hf://org/name@main")
    AdapterRef.parse("file:///srv/adapters/org/name@~1.2")   # a local directory registry
    AdapterRef.parse("s3://bucket/org/name@1.2.0")           # a plugin store's scheme
    AdapterRef.parse("./my-lora")         # a local folder or file

A string that names an existing local path is always local; ``hf://`` forces a Hub ref, and any other
``scheme://`` names the store registered under that scheme (which stores exist is the stores' business, not
this module's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import total_ordering
from pathlib import Path

from adapterhub_cli.errors import UsageError


HF_SCHEME = "hf://"
FILE_SCHEME = "file://"
#: the store name of Hub refs (``hf://`` or bare ``org/name``) and of local registry refs (``file://``)
HF, FILE = "hf", "file"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_NAME_RE = re.compile(rf"^{_NAME}$")
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_STORE_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<body>.*)$", re.DOTALL)
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


def is_repo_id(text: object) -> bool:
    """Whether ``text`` is a two-part repo id ``org/name`` (what the Hub accepts as ``base_model``)."""
    return isinstance(text, str) and _REPO_ID.match(text) is not None


def is_name(text: object) -> bool:
    """Whether ``text`` is one part of a repo id (an org or a repo name): letters, digits, ``._-``, no separator."""
    return isinstance(text, str) and _NAME_RE.match(text) is not None and text not in (".", "..")


@dataclass(frozen=True)
class AdapterRef:
    """Where an adapter (or a base model) lives: a local ``path``, or ``repo_id`` at ``revision`` in a store.

    ``revision`` is kept as written: a tag (``v1.2.0``), a bare version (``1.2.0``), ``latest``, a range
    (``^1.2``, ``~1.2``, ``1``), a branch or a 40-hex commit; None means the default branch.
    ``store`` is ``hf`` for the Hub (None reads the same), ``file`` for a local registry (``root`` is then its
    folder), or a plugin store's scheme (``repo_id`` is then everything between ``scheme://`` and ``@``).
    ``str(ref)`` gives back the text it was parsed from (``hf://`` included when it was given).
    """

    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    scheme: bool = False
    store: str | None = None
    root: str | None = None

    @classmethod
    def parse(cls, text: str | Path) -> AdapterRef:
        """Parse a path or a store ref; an existing local path wins over a Hub ref of the same spelling.

        Raises:
            UsageError: an ``hf://`` or ``file://`` ref whose repo id or revision is malformed.
        """
        if isinstance(text, Path):
            return cls(path=str(text))
        raw = text.strip()
        if raw.startswith(HF_SCHEME):
            repo, rev = _split(raw[len(HF_SCHEME) :])
            if not _HF_REPO_ID.match(repo) or rev == "":
                raise UsageError(f"{text!r} is not a Hub ref", hint="write hf://ORG/NAME[@REVISION]")
            return cls(repo_id=repo, revision=rev, scheme=True, store=HF)
        if raw.startswith(FILE_SCHEME):
            return cls.registry(raw[len(FILE_SCHEME) :], shown=text)
        m = _STORE_SCHEME.match(raw)
        if m is not None:
            body, rev = _split(m["body"])
            if not body or rev == "":
                raise UsageError(f"{text!r} is not a store ref", hint=f"write {m['scheme']}://REPO[@REVISION]")
            return cls(repo_id=body, revision=rev, scheme=True, store=m["scheme"])
        if raw.startswith(("./", "../", "/", "~", ".\\")) or Path(raw).expanduser().exists():
            return cls(path=raw)
        repo, rev = _split(raw)
        if _REPO_ID.match(repo) and rev != "":
            return cls(repo_id=repo, revision=rev, store=HF)
        return cls(path=raw)

    @classmethod
    def registry(cls, location: str, *, shown: str | None = None) -> AdapterRef:
        """A local registry ref from ``/ROOT/ORG/NAME[@REVISION]`` (the part after ``file://``, or a bare path
        below a registered store root): ``root`` is ``/ROOT``, ``repo_id`` is ``ORG/NAME``.

        Raises:
            UsageError: not an absolute path, or ORG / NAME not plain names (no ``..``, no separators).
        """
        where, rev = _split(location)
        parts = where.split("/")
        root = "/".join(parts[:-2]) or "/"
        if not where.startswith("/") or len(parts) < 4 or not all(map(is_name, parts[-2:])) or rev == "":
            raise UsageError(
                f"{shown or location!r} is not a local registry ref",
                hint="write file:///ROOT/ORG/NAME[@VERSION], e.g. file:///srv/adapters/acme/lora@^1.2",
            )
        if any(p in (".", "..") for p in parts[1:-2]):
            raise UsageError(f"{shown or location!r}: the registry root may not contain '.' or '..'")
        return cls(repo_id="/".join(parts[-2:]), revision=rev, scheme=True, store=FILE, root=root)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None and self.store in (None, HF)

    @property
    def store_name(self) -> str | None:
        """The store this ref names (``hf``, ``file``, a plugin's scheme), None for a local path."""
        return None if self.repo_id is None else (self.store or HF)

    @property
    def kind(self) -> str:
        """``local``, ``default`` (no revision), ``commit``, ``latest``, ``range``, ``version`` or ``name``
        (a tag or branch spelled out)."""
        if self.repo_id is None:
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
    def repo_ref(self) -> str:
        """The repo without a revision, as this ref writes it: ``org/name``, ``file:///srv/adapters/org/name``."""
        if self.repo_id is None:
            return str(self.path)
        if self.is_hub:
            return (HF_SCHEME if self.scheme else "") + self.repo_id
        if self.store == FILE:
            return f"{FILE_SCHEME}{(self.root or '').rstrip('/')}/{self.repo_id}"
        return f"{self.store}://{self.repo_id}"

    @property
    def display(self) -> str:
        """``org/name@rev`` without the Hub's scheme (what a user would type); other stores keep theirs."""
        if self.repo_id is None:
            return str(self.path)
        repo = self.repo_id if self.is_hub else self.repo_ref
        return f"{repo}@{self.revision}" if self.revision else repo

    def with_revision(self, revision: str | None) -> AdapterRef:
        """The same repo at another revision."""
        return AdapterRef(self.repo_id, revision, self.path, self.scheme, self.store, self.root)

    def __str__(self) -> str:
        if self.repo_id is None:
            return str(self.path)
        return (HF_SCHEME if self.scheme and self.is_hub else "") + self.display


def hub_ref(ref: AdapterRef | str) -> AdapterRef:
    """``ref`` as a Hub ref; a string is one even where a local path of that name exists (pull, push, versions).

    Raises:
        UsageError: ``ref`` is not a Hub repo ref.
    """
    parsed = ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)
    if isinstance(ref, str) and parsed.repo_id is None:
        try:
            parsed = AdapterRef.parse(HF_SCHEME + ref)
        except UsageError:
            pass
    if not parsed.is_hub or parsed.repo_id is None:
        raise UsageError(f"{ref} is not a Hub repo ref", hint="write ORG/NAME[@VERSION] or hf://ORG/NAME[@REVISION]")
    return parsed


def pick_tag(tags: Iterable[str], ref: AdapterRef) -> str | None:
    """The tag ``ref`` selects among ``tags``: the exact name, the same semver (``1.2.0`` finds ``v1.2.0``), or the
    highest release in a range / for ``latest``. None when nothing matches or ``ref`` does not select by tag."""
    names = list(tags)
    rev, kind = ref.revision, ref.kind
    if rev is None:
        return None
    if kind == "latest":  # one meaning, even where a tag is named "latest" (it may point anywhere)
        return latest_release(names)
    if rev in names:
        return rev
    parsed = {name: v for name in names if (v := tag_version(name)) is not None}
    if kind == "version":
        want = Version.parse(rev)
        return _highest({n: v for n, v in parsed.items() if v == want})  # (as for ranges: ``v1.2.0`` over ``1.2.0``)
    if kind == "range":
        bounds = version_range(rev)
        if bounds is None:
            return None
        return _highest({n: v for n, v in parsed.items() if in_range(v, bounds)})
    return None


def tag_version(name: str) -> Version | None:
    """The version a tag name spells, exactly (``v1.2.0``, ``1.2.0``); None for any other name, including one with
    spaces or a newline around a version (a tag is a server's text: only :meth:`Version.parse` of what a person
    typed forgives those)."""
    return Version.parse(name) if _SEMVER.fullmatch(name) else None


def _highest(tags: dict[str, Version]) -> str | None:
    """The tag of the highest version; of two spelling one version the ``v`` one wins."""
    return max(tags, key=lambda n: (tags[n], n.startswith("v"))) if tags else None


def latest_release(tags: Iterable[str]) -> str | None:
    """THE meaning of "latest", for ``@latest``, for a ref without a revision and for push's version check: the
    tag of the highest semver release among ``tags``, prereleases (``2.0.0-rc.1``) excluded; None when there is
    none. Of two tags spelling one version (``1.2.0`` and ``v1.2.0``) the ``v`` one wins."""
    return _highest({n: v for n in tags if (v := tag_version(n)) is not None and v.pre is None})


def ref_scheme(text: object) -> str | None:
    """The store scheme a ref is written with (``hf``, ``file``, ``s3``...), None for a bare ref or a path."""
    m = _STORE_SCHEME.match(text.strip()) if isinstance(text, str) else None
    return m["scheme"] if m is not None else None


def _split(text: str) -> tuple[str, str | None]:
    repo, sep, rev = text.partition("@")
    return repo.rstrip("/"), (rev if sep else None)
