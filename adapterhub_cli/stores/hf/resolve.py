"""Hub refs resolved to commits, and a repo's versions (tags).

A version is a git tag (``v1.3.0``) on the Hub repo and is never moved; resolving pins the commit a ref
points to. Every call goes through :mod:`adapterhub_cli.stores.hf.client` (retries, errors naming repo and
revision). In offline mode (``HF_HUB_OFFLINE=1``) refs resolve from the local HF cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.ref import HF, AdapterRef, Version, hub_ref, pick_tag
from adapterhub_cli.errors import HubError, HubNotFoundError
from adapterhub_cli.stores.hf.client import connect, offline
from adapterhub_cli.stores.records import Resolved, StoreFile, VersionInfo


if TYPE_CHECKING:
    from huggingface_hub import HfApi

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: a git object id (a commit, or the blob sha1 the Hub gives for a non-LFS file)
SHA1 = re.compile(r"^[0-9a-f]{40}$")

#: a file at a pinned commit as the Hub lists it (size; sha256 for LFS files, else the git blob sha1)
RemoteFile = StoreFile


@dataclass(frozen=True)
class HfResolved(Resolved):
    """A Hub ref resolved to a commit; ``download_revision`` is the name files are fetched by (the tag or branch
    when resolved through one), so the HF cache can serve them offline later."""

    download_revision: str | None = None


def resolve(ref: AdapterRef | str, *, api: HfApi | None = None, token: str | None = None) -> HfResolved:
    """Resolve a Hub ref to a commit: a tag, a version (``1.2.0`` finds tag ``v1.2.0``), ``latest`` (highest
    release tag), a range (``^1.2``, ``~1.2``), a branch, a commit, or nothing (the default branch).

    In offline mode (``HF_HUB_OFFLINE=1``) the ref is resolved from the local cache.

    Raises:
        HubNotFoundError: no such repo, revision, or no version matching the range.
        HubAuthError, HubError: see :func:`adapterhub_cli.stores.hf.client.hub_error`.
    """
    ref = hub_ref(ref)
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
    return HfResolved(HF, ref.repo_id, rev, info.sha, tag, files, download_revision=download_rev)


def versions(repo_id: str, *, api: HfApi | None = None, token: str | None = None) -> list[VersionInfo]:
    """The repo's tags with their commits, dates and messages: semver tags newest first, then other tags."""
    repo_id = hub_ref(repo_id).repo_id or repo_id
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


def _resolve_from_cache(ref: AdapterRef) -> HfResolved:
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
                blob if SHA1.match(blob) else None,
            )
    download = tag or (rev if kind in ("name", "commit") else None)
    return HfResolved(HF, ref.repo_id, rev, commit, tag, files, download_revision=download)
