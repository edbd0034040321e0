"""A local directory registry: the Hub's versioning semantics on a file system, for air-gapped sites and CI caches.

Refs: ``file:///ROOT/ORG/NAME[@REF]``, e.g. ``file:///srv/adapters/acme/lora@^1.2``. A folder listed in the
environment variable ``ADAPTERS_STORE_ROOTS`` (absolute paths separated by ``os.pathsep``) is a registered
root: below it the bare path ``/srv/adapters/acme/lora@1.2.0`` is the same ref. REF is a version (``1.2.0`` /
``v1.2.0``), ``latest``, a range (``^1.2``, ``~1.2``, ``1``: the Hub's grammar), a version's content id, or
nothing: the latest release, as ``latest`` (prereleases excluded; a repo holding only prereleases needs one named).

Layout::

    ROOT/ORG/NAME/versions/1.2.0/               one folder per version, never changed once there
        adapter_config.json  adapter_model.safetensors     the artifact's files, as pushed
        .README.md                               the card (hidden: a merge into a base read from the
                                                 registry does not copy the base's card; a pull writes README.md)
        .adapters-manifest.json                  {"files": {name: {"size", "sha256"}}, "created", "message", ...}
    ROOT/ORG/NAME/versions/.1.3.0.<pid>.<random>.incomplete   a push in progress (or one that crashed)

A push writes the files, the card and the manifest into a temporary folder beside the versions and publishes
it with one ``os.rename`` onto the version's name. That rename is atomic and fails when the name exists, so a
version appears completely or not at all, is never rewritten, and of two concurrent pushes of one version
exactly one wins (the other gets a :class:`VersionConflictError`). A push that crashed leaves the published
versions intact and a temporary folder that the next push sweeps once its process is gone. The content id of
a version is the sha256 of its manifest; every fetch checks a file's size and sha256 against the manifest.
Nothing is written outside the root: ORG, NAME and the version are checked to be plain names, and file
names to be plain file names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from adapterhub_cli.artifact.checkpoint import CARD_FILE, is_plain_name, stays_inside
from adapterhub_cli.artifact.files import sha256_file
from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.ref import FILE, FILE_SCHEME, AdapterRef, Version, latest_release, pick_tag
from adapterhub_cli.errors import CorruptFileError, StoreNotFoundError, UsageError, VersionConflictError, server_text
from adapterhub_cli.stores.base import Store
from adapterhub_cli.stores.publish import check_version
from adapterhub_cli.stores.records import PushResult, Resolved, StoreFile, VersionInfo, resolution_note


#: absolute folders (separated by ``os.pathsep``) below which a bare path ``/ROOT/ORG/NAME[@REF]`` is a registry ref
ROOTS_ENV = "ADAPTERS_STORE_ROOTS"
MANIFEST = ".adapters-manifest.json"
#: where a version keeps its card (listed as README.md)
STORED_CARD = "." + CARD_FILE
VERSIONS = "versions"
_CHUNK = 8 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _order(tag: str) -> Version:
    return Version.parse(tag) or Version(0, 0, 0)


def store_roots() -> list[Path]:
    """The registered roots from ``ADAPTERS_STORE_ROOTS`` (relative entries are ignored)."""
    raw = os.environ.get(ROOTS_ENV, "")
    entries = [p.strip() for p in raw.split(os.pathsep) if p.strip()]
    return [Path(os.path.normpath(p)) for p in entries if Path(p).is_absolute()]


class LocalStore(Store):
    """A local directory registry (``file://``); see the module docstring for the layout and its guarantees."""

    name = FILE
    description = (
        f"a local directory registry: file:///ROOT/ORG/NAME[@REF], or /ROOT/ORG/NAME with ROOT in ${ROOTS_ENV}"
    )

    # --------------------------------------------------------------------------------------------- refs

    def handles(self, ref: str) -> bool:
        text = ref.strip()
        if text.startswith(FILE_SCHEME):
            return True
        if not text.startswith("/"):
            return False
        where = Path(os.path.normpath(text.partition("@")[0]))
        return len(where.parts) > 3 and where.parent.parent in store_roots()

    def parse(self, ref: str | AdapterRef) -> AdapterRef:
        parsed = ref if isinstance(ref, AdapterRef) else None
        if parsed is None:
            text = str(ref).strip()
            parsed = AdapterRef.parse(text) if text.startswith(FILE_SCHEME) else AdapterRef.registry(text, shown=text)
        if parsed.store != FILE or parsed.repo_id is None or parsed.root is None:
            raise UsageError(f"{ref} is not a local registry ref", hint="write file:///ROOT/ORG/NAME[@VERSION]")
        return parsed

    def _repo_dir(self, ref: AdapterRef) -> Path:
        assert ref.root is not None and ref.repo_id is not None
        return Path(ref.root) / ref.repo_id

    @staticmethod
    def _root_prefix(ref: AdapterRef) -> str:
        return f"{FILE_SCHEME}{(ref.root or '').rstrip('/')}/"

    def _version_dir(self, resolved: Resolved) -> Path:
        assert resolved.tag is not None
        return Path(resolved.root[len(FILE_SCHEME) :]) / resolved.repo_id / VERSIONS / resolved.tag.removeprefix("v")

    def where(self, resolved: Resolved) -> Path:
        return Path(resolved.root[len(FILE_SCHEME) :]) / f"{resolved.repo_id}@{resolved.tag or resolved.commit}"

    # --------------------------------------------------------------------------------- resolve, versions

    def _published(self, ref: AdapterRef) -> dict[str, tuple[Path, dict, str]]:
        """tag -> (version folder, manifest, content id) of every complete version; raises for a missing repo."""
        repo = self._repo_dir(ref)
        if not repo.is_dir():
            raise StoreNotFoundError(
                f"no repo {ref.repo_id} in the registry {ref.root}",
                repo_id=ref.repo_ref,
                hint=f"push a first version with `adapters push PATH {ref.repo_ref} --version 0.1.0`",
            )
        out: dict[str, tuple[Path, dict, str]] = {}
        versions_dir = repo / VERSIONS
        for d in sorted(versions_dir.iterdir()) if versions_dir.is_dir() else []:
            v = Version.parse(d.name)
            manifest = d / MANIFEST
            if d.name.startswith(".") or v is None or str(v) != d.name or not manifest.is_file():
                continue
            raw = manifest.read_bytes()
            doc = parse_json(raw, path=manifest, what="the manifest")
            if not isinstance(doc, dict):
                raise CorruptFileError("the manifest is not a JSON object", path=manifest)
            out[v.tag] = (d, doc, hashlib.sha256(raw).hexdigest())
        return out

    def resolve(self, ref: str | AdapterRef) -> Resolved:
        parsed = self.parse(ref)
        published = self._published(parsed)
        rev, kind = parsed.revision, parsed.kind
        tag = latest_release(published) if rev is None else pick_tag(published, parsed)
        if tag is None and rev is not None and len(rev) >= 12:  # a content id, or a unique prefix of one
            hits = [t for t, (_, _, cid) in published.items() if cid.startswith(rev)]
            tag = hits[0] if len(hits) == 1 else None
        if tag is None:
            shown = ", ".join(sorted(published, key=lambda t: Version.parse(t) or Version(0, 0, 0))) or "none"
            only_pre = rev in (None, "latest") and published
            raise StoreNotFoundError(
                f"no version of {parsed.repo_ref} matches {rev or 'latest'!r} (published: {shown}"
                + ("; the latest is the highest release, prereleases excluded" if only_pre else "")
                + ")",
                repo_id=parsed.repo_ref,
                revision=rev,
                hint=f"name a prerelease exactly ({parsed.repo_ref}@{max(published, key=_order)})"
                if only_pre
                else f"see `adapters versions {parsed.repo_ref}`",
            )
        note = resolution_note(kind, rev, tag, None, published)
        folder, doc, content_id = published[tag]
        files = {}
        listed = doc.get("files") or {}
        for name, meta in listed.items() if isinstance(listed, dict) else [(listed, None)]:
            if not is_plain_name(name) or not isinstance(meta, dict):
                raise CorruptFileError(f"the manifest lists {name!r}, not a plain file name", path=folder / MANIFEST)
            size, sha256 = meta.get("size"), meta.get("sha256")
            if not (isinstance(size, int) and size >= 0) or not (isinstance(sha256, str) and _SHA256.match(sha256)):
                raise CorruptFileError(f"the manifest gives {name} no valid size and sha256", path=folder / MANIFEST)
            files[name] = StoreFile(name, size, sha256)
        assert parsed.repo_id is not None
        return Resolved(FILE, parsed.repo_id, rev, content_id, tag, files, root=self._root_prefix(parsed), note=note)

    def versions(self, ref: str) -> list[VersionInfo]:
        parsed = self.parse(ref)
        out = [
            VersionInfo(
                tag=tag,
                version=tag.removeprefix("v"),
                commit=cid,
                date=server_text(doc["created"]) if doc.get("created") else None,
                title=f"adapters push {tag}",
                message=server_text(doc.get("message") or ""),
            )
            for tag, (_, doc, cid) in self._published(parsed).items()
        ]
        return sorted(out, key=lambda x: Version.parse(x.tag) or Version(0, 0, 0), reverse=True)

    # ------------------------------------------------------------------------------------- read, fetch

    def _file(self, resolved: Resolved, name: str) -> Path:
        if name not in resolved.files:
            raise StoreNotFoundError(f"{name} is not a file of {resolved.label}", repo_id=resolved.repo_id)
        return self._version_dir(resolved) / (STORED_CARD if name == CARD_FILE else name)

    def read_range(self, resolved: Resolved, name: str, start: int, length: int) -> bytes:
        path = self._file(resolved, name)
        if path.is_symlink():
            raise CorruptFileError(f"{name} of {resolved.label} is a link in the registry, never followed", path=path)
        try:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError as e:
            raise CorruptFileError(f"{name} of {resolved.label} is missing from the registry", path=path) from e

    def fetch(self, resolved: Resolved, name: str) -> Path:
        path = self._file(resolved, name)
        meta = resolved.files[name]
        if not path.exists() and not path.is_symlink():
            raise CorruptFileError(f"{name} of {resolved.label} is missing from the registry", path=path)
        if path.is_symlink() or not stays_inside(path.parent, path):
            raise CorruptFileError(
                f"{name} of {resolved.label} is not a regular file in the registry (a link, a folder or a device)",
                path=path,
                hint="the registry copy was altered; publish the artifact again as a new version",
            )
        size = path.stat().st_size
        if (meta.size is not None and size != meta.size) or (
            meta.sha256 is not None and sha256_file(path) != meta.sha256
        ):
            raise CorruptFileError(
                f"{name} of {resolved.label} does not match the sha256 its version recorded ({meta.sha256})",
                path=path,
                hint="the registry copy was altered; publish the artifact again as a new version",
            )
        return path

    # ------------------------------------------------------------------------------------------ publish

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
        target = self.parse(ref)
        if target.revision is not None:
            raise UsageError(f"publish to a repo, not a revision: {ref}", hint="give the version with --version")
        root = Path(target.root or "/")
        if not root.is_dir():
            raise UsageError(
                f"the registry root {root} does not exist", hint=f"create it first (mkdir -p {root}), then push again"
            )
        bad = [n for n in files if not is_plain_name(n) or n.startswith(".")]
        if bad:
            raise UsageError(f"cannot publish {bad[0]!r}: files of a version are plain, visible file names")
        versions_dir = self._repo_dir(target) / VERSIONS
        versions_dir.mkdir(parents=True, exist_ok=True)
        _sweep(versions_dir)
        published = self._published(target)
        check_version(target.repo_ref, version, {t: cid for t, (_, _, cid) in published.items()}, force)
        final = versions_dir / str(version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.{os.getpid()}.", suffix=".incomplete", dir=versions_dir))
        try:
            manifest = _write_version(tmp, files, card, target, version, message)
            _rename_new(tmp, final, target, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            _fsync_dir(versions_dir)
        return PushResult(
            repo_id=target.repo_ref,
            version=str(version),
            tag=version.tag,
            commit=hashlib.sha256(manifest).hexdigest(),
            ref=f"{target.repo_ref}@{version.tag}",
            url=final.as_uri(),
            files=[*files, *([CARD_FILE] if card is not None else [])],
        )


def _write_version(
    folder: Path,
    files: Mapping[str, Path],
    card: str | None,
    target: AdapterRef,
    version: Version,
    message: str | None,
) -> bytes:
    """Copy ``files`` (hashing as they are copied) and the card into ``folder``, then the manifest; its bytes."""
    entries: dict[str, dict[str, int | str]] = {}
    for name, src in files.items():
        h = hashlib.sha256()
        size = 0
        with src.open("rb") as fin, (folder / name).open("wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        entries[name] = {"size": size, "sha256": h.hexdigest()}
    if card is not None:
        data = card.encode()
        (folder / STORED_CARD).write_bytes(data)
        entries[CARD_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    doc = {
        "repo": target.repo_id,
        "version": str(version),
        "tag": version.tag,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "message": message or "",
        "files": entries,
    }
    raw = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    (folder / MANIFEST).write_bytes(raw)
    for p in folder.iterdir():
        p.chmod(0o444)  # a published version is read-only
    folder.chmod(0o755)  # mkdtemp made it private; a registry is read by others
    _fsync_dir(folder)
    return raw


def _rename_new(tmp: Path, final: Path, target: AdapterRef, version: Version) -> None:
    """``os.rename`` the complete version into place; a version that appeared meanwhile wins and this push fails."""
    try:
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        tmp.rename(final)  # os.rename: atomic; fails when another push put a (non-empty) folder there first
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise VersionConflictError(
            f"{target.repo_ref}@{version.tag} was published by another push meanwhile; published versions are never "
            "moved",
            repo_id=target.repo_ref,
            revision=version.tag,
            hint="publish a new version number",
        ) from e


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(versions_dir: Path) -> None:
    """Remove temporary folders of pushes whose process is gone (killed, crashed, power loss)."""
    for leftover in versions_dir.glob(".*.incomplete"):
        parts = leftover.name.removesuffix(".incomplete").rsplit(".", 2)
        pid = parts[1] if len(parts) == 3 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:  # a live process of another user
            continue
