"""The ``zip`` store: read adapters (and bases) straight out of a zip bundle, without unpacking it.

A bundle is a zip archive of a local registry's layout, so zipping a ``file://`` registry makes one::

    bundle.zip
        acme/lora/versions/1.0.0/adapter_config.json
        acme/lora/versions/1.0.0/adapter_model.safetensors
        acme/lora/versions/1.0.0/.adapters-manifest.json     (optional: sha256 of each file)
        acme/lora/versions/1.1.0/...

Refs: ``zip:///ABSOLUTE/PATH/bundle.zip/ORG/NAME[@REF]``, REF as everywhere (``1.1.0``, ``^1.0``, ``latest``,
a content id). The store is read-only: ship a new bundle to publish. A version's content id is the sha256 of
its manifest when the bundle has one (the same id the ``file://`` registry gives it), else of the names, sizes
and CRC-32s of its files. Every file is checked against the sha256 the manifest records before it is used:
``fetch`` extracts whole files into a folder of this process (removed at exit), and a range read of a small
file (a config) reads it whole. Safetensors headers are read by range from the archive (store members
uncompressed, ``zip -0``, and a range read is a seek); the weights are checked when fetched.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from adapterhub_cli import AdapterRef, CorruptFileError, HubNotFoundError, UsageError
from adapterhub_cli.artifact.ref import Version, pick_tag
from adapterhub_cli.stores.base import Store
from adapterhub_cli.stores.records import PushResult, Resolved, StoreFile, VersionInfo


SCHEME = "zip://"
MANIFEST = ".adapters-manifest.json"
VERSIONS = "versions"
SMALL = 1 << 20  # files up to this size are checked whole even when read by range


class ZipStore(Store):
    """Read-only adapters from zip bundles (see the module docstring)."""

    name = "zip"
    description = "a read-only zip bundle of a registry: zip:///PATH/bundle.zip/ORG/NAME[@REF] (example plugin)"

    # --------------------------------------------------------------------------------------------- refs

    def handles(self, ref: str) -> bool:
        return ref.strip().startswith(SCHEME)

    def _split(self, ref: str | AdapterRef) -> tuple[Path, AdapterRef]:
        """The archive and the ref inside it (``repo_id`` ``ORG/NAME``, the revision as written)."""
        parsed = ref if isinstance(ref, AdapterRef) else AdapterRef.parse(str(ref).strip())
        body = parsed.repo_id or ""
        archive, sep, repo = body.partition(".zip/")
        if parsed.store != self.name or not sep or not archive.startswith("/") or repo.count("/") != 1:
            raise UsageError(f"{ref} is not a zip bundle ref", hint="write zip:///PATH/bundle.zip/ORG/NAME[@VERSION]")
        return Path(archive + ".zip"), AdapterRef(repo_id=repo, revision=parsed.revision, scheme=True, store=self.name)

    def where(self, resolved: Resolved) -> Path:
        return Path(resolved.label.removeprefix(SCHEME))

    # --------------------------------------------------------------------------------- resolve, versions

    def _published(self, archive: Path, repo: str) -> dict[str, dict[str, Any]]:
        """tag -> {"files": {name: ZipInfo}, "manifest": dict | None, "id": content id} of each version of ``repo``."""
        if not archive.is_file():
            raise HubNotFoundError(f"no zip bundle at {archive}", repo_id=f"{SCHEME}{archive}")
        base = f"{repo}/{VERSIONS}/"
        found: dict[str, dict[str, Any]] = {}
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(base):
                    continue
                version, _, name = info.filename[len(base) :].partition("/")
                v = Version.parse(version)
                if v is None or str(v) != version or not name or "/" in name:
                    continue
                entry = found.setdefault(v.tag, {"files": {}, "manifest": None})
                if name == MANIFEST:
                    raw = zf.read(info)
                    try:
                        entry["manifest"] = json.loads(raw)
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise CorruptFileError(f"{info.filename} is not valid JSON ({e})", path=archive) from e
                    entry["id"] = hashlib.sha256(raw).hexdigest()
                else:
                    entry["files"][name] = info
        for entry in found.values():  # a file:// registry keeps the card hidden (.README.md), listed as README.md
            for name in (entry["manifest"] or {}).get("files") or {}:
                if name not in entry["files"] and f".{name}" in entry["files"]:
                    entry["files"][name] = entry["files"].pop(f".{name}")
        if not found:
            raise HubNotFoundError(f"no repo {repo} in the bundle {archive}", repo_id=f"{SCHEME}{archive}/{repo}")
        for entry in found.values():
            if "id" not in entry:
                listing = sorted((n, i.file_size, i.CRC) for n, i in entry["files"].items())
                entry["id"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return found

    def resolve(self, ref: str | AdapterRef) -> Resolved:
        archive, parsed = self._split(ref)
        assert parsed.repo_id is not None
        published = self._published(archive, parsed.repo_id)
        rev = parsed.revision
        tag = pick_tag(published, parsed if rev is not None else parsed.with_revision("latest"))
        if tag is None and rev is not None:
            tag = next((t for t, e in published.items() if e["id"] == rev), None)
        if tag is None:
            raise HubNotFoundError(
                f"no version of {parsed.repo_id} in {archive} matches {rev or 'latest'!r} "
                f"(bundled: {', '.join(sorted(published))})",
                repo_id=parsed.repo_id,
                revision=rev,
            )
        entry = published[tag]
        recorded = (entry["manifest"] or {}).get("files") or {}
        files = {
            name: StoreFile(name, info.file_size, (recorded.get(name) or {}).get("sha256"))
            for name, info in entry["files"].items()
        }
        return Resolved(self.name, parsed.repo_id, rev, entry["id"], tag, files, root=f"{SCHEME}{archive}/")

    def versions(self, ref: str) -> list[VersionInfo]:
        archive, parsed = self._split(ref)
        assert parsed.repo_id is not None
        out = []
        for tag, entry in self._published(archive, parsed.repo_id).items():
            stamps = [datetime(*i.date_time) for i in entry["files"].values()]
            manifest = entry["manifest"] or {}
            date = manifest.get("created") or (max(stamps).isoformat() if stamps else None)
            out.append(VersionInfo(tag, tag.removeprefix("v"), entry["id"], date, f"bundled {tag}", ""))
        return sorted(out, key=lambda v: Version.parse(v.tag) or Version(0, 0, 0), reverse=True)

    # ------------------------------------------------------------------------------------- read, fetch

    def _member(self, resolved: Resolved, name: str) -> tuple[Path, str]:
        if name not in resolved.files:
            raise HubNotFoundError(f"{name} is not a file of {resolved.label}", repo_id=resolved.repo_id)
        archive = Path(resolved.root.removeprefix(SCHEME).rstrip("/"))
        version = resolved.tag.removeprefix("v") if resolved.tag else ""
        return archive, str(PurePosixPath(resolved.repo_id, VERSIONS, version, name))

    def read_range(self, resolved: Resolved, name: str, start: int, length: int) -> bytes:
        archive, member = self._member(resolved, name)
        with zipfile.ZipFile(archive) as zf:
            info = _info(zf, member)
            if resolved.files[name].sha256 is not None and info.file_size <= SMALL:
                data = zf.read(info)  # a small file (a config) is checked whole before any of it is used
                _check(resolved, name, data, archive)
                return data[start : start + length]
            with zf.open(info) as f:
                f.seek(start)
                return f.read(length)

    def fetch(self, resolved: Resolved, name: str) -> Path:
        archive, member = self._member(resolved, name)
        key = hashlib.sha256(f"{archive}\0{resolved.commit}".encode()).hexdigest()[:24]
        folder = _cache() / key
        path = folder / name
        if path.is_file():
            _check(resolved, name, path.read_bytes(), archive)
            return path
        with zipfile.ZipFile(archive) as zf:
            try:
                data = zf.read(_info(zf, member))  # checks the member's CRC-32
            except zipfile.BadZipFile as e:
                raise CorruptFileError(f"{name} of {resolved.label} is damaged ({e})", path=archive) from e
        _check(resolved, name, data, archive)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".incomplete", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp_name).replace(path)  # atomic: a concurrent reader sees no half-written file
        return path

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
        raise UsageError(
            f"{ref}: zip bundles are read-only",
            hint="push to a file:// registry, then zip it (zip -r -0 bundle.zip ORG) to ship a new bundle",
        )


def _info(zf: zipfile.ZipFile, member: str) -> zipfile.ZipInfo:
    """The archive entry of ``member``, or of its hidden twin (``.README.md`` for ``README.md``)."""
    try:
        return zf.getinfo(member)
    except KeyError:
        folder, _, name = member.rpartition("/")
        return zf.getinfo(f"{folder}/.{name}")


_CACHE: list[Path] = []


def _cache() -> Path:
    """This process's folder for fetched files (removed when the process exits)."""
    if not _CACHE:
        _CACHE.append(Path(tempfile.mkdtemp(prefix="adapters-zip-")))
        atexit.register(shutil.rmtree, _CACHE[0], ignore_errors=True)
    return _CACHE[0]


def _check(resolved: Resolved, name: str, data: bytes, archive: Path) -> None:
    """Refuse bytes that disagree with the sha256 the version's manifest recorded (when it has one)."""
    want = resolved.files[name].sha256
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise CorruptFileError(
            f"{name} of {resolved.label} does not match its recorded sha256 ({want})",
            path=archive,
            hint="the bundle was altered after it was made; make it again from the registry",
        )
