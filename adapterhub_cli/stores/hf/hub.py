"""Versioned adapters on the Hugging Face Hub: resolve, versions, pull (and :func:`push`, from ``hub_push``).

A version is a git tag (``v1.3.0``) on the Hub repo and is never moved; a pull pins the commit a ref
resolves to. Every function takes an injected ``huggingface_hub.HfApi`` (its endpoint and token) or builds
the default one, and uses only public ``HfApi`` calls, through :mod:`adapterhub_cli.stores.hf.client` (retries,
errors naming repo and revision). The token is passed to ``huggingface_hub`` and nowhere else: never
printed, logged or carded.

``huggingface_hub`` is imported only when a Hub function runs, so ``import adapterhub_cli`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.checkpoint import INDEX_FILE, SINGLE_FILE
from adapterhub_cli.artifact.files import atomic_dir, read_json, sha256_file
from adapterhub_cli.artifact.ref import AdapterRef, Version, in_range, version_range
from adapterhub_cli.errors import CorruptFileError, HubError, HubNotFoundError, InvalidAdapterError
from adapterhub_cli.formats.peft import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from adapterhub_cli.stores.hf.client import (
    CARD_NAME,
    WEIGHT_SUFFIXES,
    Client,
    as_hub_ref,
    connect,
    get_api,
    offline,
)
from adapterhub_cli.stores.hf.push import PushResult, push


if TYPE_CHECKING:
    from huggingface_hub import HfApi

#: Written beside the files of ``pull(..., out=DIR)``: where they came from, the pinned commit, their sha256.
PULL_RECORD = ".adapters-pull.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")

__all__ = [
    "CARD_NAME",
    "PULL_RECORD",
    "WEIGHT_SUFFIXES",
    "Client",
    "PullResult",
    "PushResult",
    "RemoteFile",
    "Resolved",
    "VersionInfo",
    "fetch_file",
    "get_api",
    "offline",
    "pull",
    "pulled_from",
    "push",
    "resolve",
    "select_files",
    "versions",
]


# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RemoteFile:
    """A file at a pinned commit: its size and the hashes the Hub reports (sha256 for LFS files)."""

    name: str
    size: int | None = None
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A Hub ref resolved to a commit, with the tag it was found through (if any) and the files there."""

    repo_id: str
    requested: str | None
    commit: str
    tag: str | None
    files: dict[str, RemoteFile]
    download_revision: str | None = None  # the name files are fetched by, so the cache can serve it offline

    @property
    def pinned(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    @property
    def label(self) -> str:
        """``org/name@v1.2.0`` when found through a tag (tags are never moved), else ``org/name@<commit>``."""
        return f"{self.repo_id}@{self.tag or self.commit}"


@dataclass(frozen=True)
class VersionInfo:
    """One tag of a repo: its name, semver (None for other tags), commit, date and commit message."""

    tag: str
    version: str | None
    commit: str
    date: str | None
    title: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    """Where ``pull`` put the files (a folder of ``out``, or the HF cache snapshot) and what it pinned."""

    path: Path
    repo_id: str
    requested: str | None
    commit: str
    tag: str | None
    files: dict[str, str]  # name -> sha256 of the local file

    @property
    def pinned(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------------------ calls and errors


# ----------------------------------------------------------------------------- resolve, versions


def pick_tag(tags: dict[str, str], ref: AdapterRef) -> str | None:
    """The tag ``ref`` selects among ``tags`` (name -> commit): the exact name, the same semver, or the highest
    release in a range / ``latest``. None when ``ref`` does not select by tag."""
    rev, kind = ref.revision, ref.kind
    if rev is None:
        return None
    if rev in tags:
        return rev
    parsed = {name: v for name in tags if (v := Version.parse(name)) is not None}
    if kind == "version":
        want = Version.parse(rev)
        return next((n for n, v in sorted(parsed.items(), key=lambda x: x[0]) if v == want), None)
    if kind == "latest":
        releases = {n: v for n, v in parsed.items() if v.pre is None}
        return max(releases, key=lambda n: releases[n]) if releases else None
    if kind == "range":
        bounds = version_range(rev)
        if bounds is None:
            return None
        hits = {n: v for n, v in parsed.items() if in_range(v, bounds)}
        return max(hits, key=lambda n: hits[n]) if hits else None
    return None


def resolve(ref: AdapterRef | str, *, api: HfApi | None = None, token: str | None = None) -> Resolved:
    """Resolve a Hub ref to a commit: a tag, a version (``1.2.0`` finds tag ``v1.2.0``), ``latest`` (highest
    release tag), a range (``^1.2``, ``~1.2``), a branch, a commit, or nothing (the default branch).

    In offline mode (``HF_HUB_OFFLINE=1``) the ref is resolved from the local cache.

    Raises:
        HubNotFoundError: no such repo, revision, or no version matching the range.
        HubAuthError, HubError: see :func:`adapterhub_cli.stores.hf.client.hub_error`.
    """
    ref = as_hub_ref(ref)
    assert ref.repo_id is not None
    if offline():
        return _resolve_from_cache(ref)
    client = connect(ref.repo_id, api, token)
    rev, kind = ref.revision, ref.kind
    tags: dict[str, str] = {}
    branches: dict[str, str] = {}
    if kind not in ("commit", "default"):
        refs = client.call("listing the refs of", "list_repo_refs", ref.repo_id, shown=rev)
        tags = {t.name: t.target_commit for t in refs.tags}
        branches = {b.name: b.target_commit for b in refs.branches}
    tag = pick_tag(tags, ref)
    if tag is None and kind in ("version", "latest", "range"):
        published = ", ".join(sorted(tags, key=lambda n: Version.parse(n) or Version(0, 0, 0))) or "none"
        raise HubNotFoundError(
            f"no version of {ref.repo_id} matches {rev!r} (published tags: {published})",
            repo_id=ref.repo_id,
            revision=rev,
            hint=f"see `adapters versions {ref.repo_id}`",
        )
    target = tags[tag] if tag else branches.get(rev or "", rev)
    info = client.call("reading", "model_info", ref.repo_id, revision=target, files_metadata=True, shown=rev)
    files = {
        s.rfilename: RemoteFile(
            s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None, getattr(s, "blob_id", None)
        )
        for s in info.siblings or []
    }
    download_rev = tag or (rev if kind == "name" and rev in branches else None if kind == "default" else info.sha)
    return Resolved(ref.repo_id, rev, info.sha, tag, files, download_rev)


def versions(repo_id: str, *, api: HfApi | None = None, token: str | None = None) -> list[VersionInfo]:
    """The repo's tags with their commits, dates and messages: semver tags newest first, then other tags."""
    repo_id = as_hub_ref(repo_id).repo_id or repo_id
    client = connect(repo_id, api, token)
    refs = client.call("listing the refs of", "list_repo_refs", repo_id)
    commits: dict[str, Any] = {}
    for t in refs.tags:
        if t.target_commit not in commits:
            history = client.call("listing the commits of", "list_repo_commits", repo_id, revision=t.target_commit)
            commits.update({c.commit_id: c for c in history})
    out = []
    for t in refs.tags:
        c = commits.get(t.target_commit)
        v = Version.parse(t.name)
        out.append(
            VersionInfo(
                tag=t.name,
                version=str(v) if v else None,
                commit=t.target_commit,
                date=c.created_at.isoformat() if c is not None and c.created_at else None,
                title=c.title if c is not None else "",
                message=(c.message or "") if c is not None else "",
            )
        )
    semver = sorted(
        (x for x in out if x.version), key=lambda x: Version.parse(x.tag) or Version(0, 0, 0), reverse=True
    )
    others = sorted((x for x in out if not x.version), key=lambda x: x.date or "", reverse=True)
    return semver + others


def _cache_repo_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _resolve_from_cache(ref: AdapterRef) -> Resolved:
    assert ref.repo_id is not None
    repo_dir = _cache_repo_dir(ref.repo_id)
    refs_dir = repo_dir / "refs"
    names = {p.name: p.read_text().strip() for p in refs_dir.iterdir() if p.is_file()} if refs_dir.is_dir() else {}
    tag = pick_tag(names, ref)
    rev, kind = ref.revision, ref.kind
    commit = names.get(tag) if tag else names.get(rev or "main") if kind in ("name", "default") else rev
    snapshot = repo_dir / "snapshots" / (commit or "-")
    if commit is None or not snapshot.is_dir():
        raise HubError(
            f"{ref.display} is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1)",
            repo_id=ref.repo_id,
            revision=rev,
            hint="unset HF_HUB_OFFLINE, or pull it once while online",
        )
    files = {}
    for p in sorted(snapshot.iterdir()):
        if p.is_file():
            blob = p.resolve().name
            files[p.name] = RemoteFile(
                p.name,
                p.stat().st_size,
                blob if _SHA256.match(blob) else None,
                blob if _SHA1.match(blob) else None,
            )
    return Resolved(ref.repo_id, rev, commit, tag, files, tag or (rev if kind in ("name", "commit") else None))


# ------------------------------------------------------------------------------------------- pull


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _verified(path: Path, meta: RemoteFile | None) -> str | None:
    """The local file's sha256 if it matches what the Hub reports (sha256 for LFS, git blob sha1 otherwise).

    The digest cache (keyed by file identity and modification time) spares rehashing a cached shard on every
    use; a fresh or re-downloaded file is a new file and is hashed again.
    """
    digest = sha256_file(path)
    if meta is None:
        return digest
    if meta.sha256 is not None:
        return digest if digest == meta.sha256 else None
    if meta.blob_id is not None and _SHA1.match(meta.blob_id):
        return digest if git_blob_sha1(path) == meta.blob_id else None
    return digest


def fetch_file(resolved: Resolved, name: str, *, api: HfApi | None = None, token: str | None = None) -> Path:
    """Download one file of the pinned commit into the HF cache (or take it from there) and check its hash.

    Raises:
        CorruptFileError: the file's sha256 disagrees with the Hub's LFS metadata, even after a fresh download.
        HubError: the ref moved to another commit while downloading, or the download failed.
    """
    return _fetch(resolved, name, api=api, token=token)[0]


def _fetch(resolved: Resolved, name: str, *, api: HfApi | None, token: str | None) -> tuple[Path, str]:
    client = connect(resolved.repo_id, api, token)
    meta = resolved.files.get(name)
    for force in (False, True):
        path = Path(
            client.call(
                "downloading",
                "hf_hub_download",
                resolved.repo_id,
                name,
                revision=resolved.download_revision,
                shown=resolved.requested,
                filename=name,
                force_download=force,
                local_files_only=offline(),
            )
        )
        if path.parent.name != resolved.commit:
            raise HubError(
                f"{resolved.repo_id}@{resolved.download_revision} moved to commit {path.parent.name} while pulling "
                f"{resolved.commit}",
                repo_id=resolved.repo_id,
                revision=resolved.requested,
                hint="pull again",
            )
        digest = _verified(path, meta)
        if digest is not None:
            return path, digest
    raise CorruptFileError(
        f"{name} of {resolved.pinned} does not match the Hub's sha256 {meta.sha256 if meta else ''} after a "
        "fresh download",
        path=path,
        hint="the file was altered in transit or in the cache; delete the cache entry and pull again",
    )


def select_files(resolved: Resolved, *, allow_pickle: bool = False) -> list[str]:
    """The files a pull needs: an adapter's config, weights and card; or a model's config, side files and weights.

    safetensors are preferred; a legacy ``.bin`` is taken only with ``allow_pickle`` and no safetensors.
    """
    names = set(resolved.files)
    top = sorted(n for n in names if "/" not in n and not n.startswith("."))
    if CONFIG_NAME in names or WEIGHTS_NAME in names:
        wanted = [n for n in (CONFIG_NAME, CARD_NAME) if n in names]
        if WEIGHTS_NAME in names:
            return [*wanted, WEIGHTS_NAME]
        if LEGACY_WEIGHTS_NAME in names and allow_pickle:
            return [*wanted, LEGACY_WEIGHTS_NAME]
        if LEGACY_WEIGHTS_NAME in names:
            raise InvalidAdapterError(
                f"{resolved.label} holds only a legacy pickle {LEGACY_WEIGHTS_NAME}",
                hint="pass --allow-pickle (loaded with torch.load(weights_only=True))",
            )
        raise HubNotFoundError(f"{resolved.label} has {CONFIG_NAME} but no {WEIGHTS_NAME}", repo_id=resolved.repo_id)
    side = [n for n in top if not n.endswith(WEIGHT_SUFFIXES)]
    if SINGLE_FILE in names or INDEX_FILE in names:
        return side + [n for n in top if n.endswith(".safetensors")]
    if allow_pickle and any(n.endswith(".bin") for n in top):
        return side + [n for n in top if n.endswith(".bin")]
    raise HubNotFoundError(
        f"{resolved.label} holds no adapter ({CONFIG_NAME} / {WEIGHTS_NAME}) and no safetensors model",
        repo_id=resolved.repo_id,
        revision=resolved.requested,
    )


def pull(
    ref: AdapterRef | str,
    *,
    out: str | Path | None = None,
    api: HfApi | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> PullResult:
    """Resolve ``ref`` to a commit and download only the adapter's (or merged model's) files, hash-checked.

    Without ``out`` the files stay in the HF cache and ``path`` is the snapshot folder of the pinned commit.
    With ``out`` they are copied into that folder (atomically) with a ``.adapters-pull.json`` record of the
    repo, the requested ref, the pinned commit and each file's sha256.
    """
    ref = as_hub_ref(ref)
    resolved = resolve(ref, api=api, token=token)
    names = select_files(resolved, allow_pickle=allow_pickle)
    fetched = {n: _fetch(resolved, n, api=api, token=token) for n in names}
    local = {n: p for n, (p, _) in fetched.items()}
    hashes = {n: digest for n, (_, digest) in fetched.items()}
    result = PullResult(
        next(iter(local.values())).parent, resolved.repo_id, ref.revision, resolved.commit, resolved.tag, hashes
    )
    if out is None:
        return result
    record = {
        "repo_id": resolved.repo_id,
        "requested": str(ref),
        "commit": resolved.commit,
        "tag": resolved.tag,
        "files": hashes,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for n, p in local.items():
            shutil.copyfile(p, tmp / n)
        (tmp / PULL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    result.path = Path(out)
    return result


def pulled_from(folder: str | Path) -> str | None:
    """``hf://org/name@<commit>`` for a folder written by :func:`pull` (from its record), else None."""
    record = Path(folder) / PULL_RECORD
    if not record.is_file():
        return None
    try:
        doc = read_json(record, PULL_RECORD)
        return f"hf://{doc['repo_id']}@{doc['commit']}"
    except (InvalidAdapterError, KeyError, TypeError):
        return None
