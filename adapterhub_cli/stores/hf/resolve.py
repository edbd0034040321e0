"""Hub refs resolved to commits, and a repo's versions (tags).

A version is a git tag (``v1.3.0``) on the Hub repo and is never moved; resolving pins the commit a ref
points to. Every call goes through :mod:`adapterhub_cli.stores.hf.client` (retries, errors naming repo and
revision). In offline mode (``HF_HUB_OFFLINE=1``) refs resolve from the local HF cache.

The Hub's answers are untrusted: commit ids must be 40 lowercase hex digits (and the commit a ref was resolved to
must be the one the listing describes), file names relative paths of plain names, sizes counts and hashes hex,
before anything is built from them; a :class:`~adapterhub_cli.errors.HubResponseError` refuses anything else.
Text shown to people (tags, commit titles and messages) is :func:`~adapterhub_cli.errors.server_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.checkpoint import is_relative_name, regular_files
from adapterhub_cli.artifact.ref import HF, AdapterRef, Version, hub_ref, latest_release, pick_tag
from adapterhub_cli.errors import HubError, HubNotFoundError, HubResponseError, server_line, server_text
from adapterhub_cli.stores.hf import cache
from adapterhub_cli.stores.hf.cache import SHA1, SHA256
from adapterhub_cli.stores.hf.client import Client, connect, get_api, offline
from adapterhub_cli.stores.records import Resolved, StoreFile, VersionInfo, resolution_note


if TYPE_CHECKING:
    from huggingface_hub import HfApi

#: a file at a pinned commit as the Hub lists it (size; sha256 for LFS files, else the git blob sha1)
RemoteFile = StoreFile

_UNTRUSTED_HINT = "the endpoint is misbehaving or not the Hub (check HF_ENDPOINT); nothing was written"


def _shown(value: object) -> str:
    """A server value for a message: its repr, short, without secrets or escape sequences."""
    return server_line(repr(value), limit=80)


def commit_id(value: object, *, what: str, repo_id: str) -> str:
    """``value`` if it is a commit id (40 lowercase hex digits), as every commit id from the Hub must be.

    Raises:
        HubResponseError: anything else.
    """
    if not isinstance(value, str) or not SHA1.match(value):
        raise HubResponseError(
            f"the Hub answered {_shown(value)} as {what} of {repo_id}, which is not a commit id",
            repo_id=repo_id,
            hint=_UNTRUSTED_HINT,
        )
    return value


def repo_refs(client: Client, repo_id: str, *, shown: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The repo's (tags, branches), each name -> commit id, checked: names are strings, commits commit ids.

    Raises:
        HubResponseError: a name that is not a string, or a target that is not a commit id.
        HubError: the call failed.
    """
    refs = client.call("listing the refs of", "list_repo_refs", repo_id, shown=shown)
    out: tuple[dict[str, str], dict[str, str]] = ({}, {})
    for kind, listed, into in (("tag", refs.tags, out[0]), ("branch", refs.branches, out[1])):
        for r in listed or []:
            if not isinstance(r.name, str) or not r.name:
                raise HubResponseError(
                    f"the Hub listed a {kind} of {repo_id} named {_shown(r.name)}",
                    repo_id=repo_id,
                    hint=_UNTRUSTED_HINT,
                )
            into[r.name] = commit_id(r.target_commit, what=f"the commit of {kind} {_shown(r.name)}", repo_id=repo_id)
    return out


def listed_files(info: Any, repo_id: str) -> dict[str, StoreFile]:
    """The files of a ``model_info(..., files_metadata=True)`` answer, checked: each name a relative path of plain
    names (listed once), each size a count, each hash hex (an LFS sha256, or the git blob sha1).

    Raises:
        HubResponseError: a name, size or hash that is not one.
    """
    files: dict[str, StoreFile] = {}
    siblings = info.siblings or []
    if not isinstance(siblings, list):
        raise HubResponseError(f"the Hub's listing of {repo_id} is not a list of files", repo_id=repo_id)
    for s in siblings:
        name, size, blob_id = s.rfilename, s.size, getattr(s, "blob_id", None)
        sha256 = s.lfs.sha256 if s.lfs is not None else None
        problem = (
            f"a file name that is not a relative path of plain names: {_shown(name)}"
            if not is_relative_name(name)
            else f"{name} listed twice"
            if name in files
            else f"a size that is not a count of bytes for {name}: {_shown(size)}"
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0)
            else f"a git blob id that is not 40 hex digits for {name}: {_shown(blob_id)}"
            if not (isinstance(blob_id, str) and SHA1.match(blob_id))
            else f"an LFS sha256 that is not 64 hex digits for {name}: {_shown(sha256)}"
            if sha256 is not None and not (isinstance(sha256, str) and SHA256.match(sha256))
            else None
        )
        if problem is not None:
            raise HubResponseError(
                f"the Hub's listing of {repo_id} has {problem}", repo_id=repo_id, hint=_UNTRUSTED_HINT
            )
        files[name] = RemoteFile(name, size, sha256, blob_id)
    return files


@dataclass(frozen=True)
class HfResolved(Resolved):
    """A Hub ref resolved to a commit; ``download_revision`` is the name files are fetched by (the tag or branch
    when resolved through one), so the HF cache can serve them offline later."""

    download_revision: str | None = None


def resolve(ref: AdapterRef | str, *, api: HfApi | None = None, token: str | None = None) -> HfResolved:
    """Resolve a Hub ref to a commit: a tag, a version (``1.2.0`` finds tag ``v1.2.0``), ``latest`` (the highest
    release tag, prereleases excluded: :func:`~adapterhub_cli.artifact.ref.latest_release`), a range (``^1.2``,
    ``~1.2``), a branch, a commit, or nothing: the latest release when the repo has release tags, else the default
    branch. ``note`` says which, for a ref that named no exact version.

    In offline mode (``HF_HUB_OFFLINE=1``) the ref is resolved from the local cache (and the tags last seen online).

    Raises:
        HubNotFoundError: no such repo, revision, or no version matching the range.
        HubAuthError, HubError: see :func:`adapterhub_cli.stores.hf.client.hub_error`.
    """
    ref = hub_ref(ref)
    assert ref.repo_id is not None
    if offline():
        return _resolve_from_cache(ref, _endpoint(api))
    client = connect(ref.repo_id, api, token)
    rev, kind = ref.revision, ref.kind
    tags: dict[str, str] = {}
    branches: dict[str, str] = {}
    if kind != "commit":
        tags, branches = repo_refs(client, ref.repo_id, shown=rev)
        _remember(client, ref.repo_id, tags)
    tag = latest_release(tags) if kind == "default" else pick_tag(tags, ref)
    if tag is None and kind in ("version", "latest", "range"):
        published = ", ".join(sorted(tags, key=lambda n: Version.parse(n) or Version(0, 0, 0))) or "none"
        raise HubNotFoundError(
            f"no version of {ref.repo_id} matches {rev!r} (published tags: {published}"
            + ("; `latest` is the highest release, prereleases excluded" if kind == "latest" and tags else "")
            + ")",
            repo_id=ref.repo_id,
            revision=rev,
            hint=f"see `adapters versions {ref.repo_id}`",
        )
    target = tags[tag] if tag else branches.get(rev or "", rev)
    info = client.call("reading", "model_info", ref.repo_id, revision=target, files_metadata=True, shown=rev)
    commit = commit_id(info.sha, what=f"the commit of {rev or 'the default branch'}", repo_id=ref.repo_id)
    if target is not None and SHA1.match(target) and commit != target:
        raise HubResponseError(
            f"the Hub described commit {commit} when asked for {target} of {ref.repo_id}",
            repo_id=ref.repo_id,
            revision=rev,
            hint=_UNTRUSTED_HINT,
        )
    files = listed_files(info, ref.repo_id)
    branch = rev if tag is None and kind == "name" and rev in branches else None
    if tag is None and kind == "default":
        branch = (
            "main" if branches.get("main") == commit else next((b for b, c in branches.items() if c == commit), None)
        )
    note = resolution_note(kind, rev, tag, branch, tags)
    download_rev = tag or branch or (None if kind == "default" else commit)
    return HfResolved(
        HF, ref.repo_id, rev, commit, tag, files, branch=branch, note=note, download_revision=download_rev
    )


def _remember(client: Client, repo_id: str, tags: dict[str, str]) -> None:
    """Record the tags just listed (for offline ``versions`` and offline refs without a revision)."""
    rows = [
        VersionInfo(
            tag=name, version=str(v) if (v := Version.parse(name)) else None, commit=c, date=None, title="", message=""
        )
        for name, c in tags.items()
        if server_text(name) == name
    ]
    cache.record_versions(repo_id, rows, endpoint=str(client.api.endpoint))


def versions(repo_id: str, *, api: HfApi | None = None, token: str | None = None) -> list[VersionInfo]:
    """The repo's tags with their commits, dates and messages: semver tags newest first, then other tags.

    In offline mode (``HF_HUB_OFFLINE=1``) the tags last seen online (by ``versions``, or by resolving any ref of
    the repo), each row's ``seen_at`` saying when; failing that, the version tags of the repo in the HF cache.

    Raises:
        HubError: offline mode and nothing of the repo is cached; HubNotFoundError, HubAuthError online.
    """
    repo_id = hub_ref(repo_id).repo_id or repo_id
    if offline():
        return _versions_from_cache(repo_id, _endpoint(api))
    client = connect(repo_id, api, token)
    targets, _ = repo_refs(client, repo_id)
    commits: dict[str, Any] = {}
    for target in targets.values():
        if target not in commits:
            history = client.call("listing the commits of", "list_repo_commits", repo_id, revision=target)
            commits.update({c.commit_id: c for c in history})
    out = []
    for name, target in targets.items():
        c = commits.get(target)
        v = Version.parse(name)
        out.append(
            VersionInfo(
                tag=server_text(name),
                version=str(v) if v else None,
                commit=target,
                date=c.created_at.isoformat() if c is not None and c.created_at else None,
                title=server_text(c.title or "") if c is not None else "",
                message=server_text(c.message or "") if c is not None else "",
            )
        )
    rows = _ordered(out)
    cache.record_versions(repo_id, rows, endpoint=str(client.api.endpoint))
    return rows


def _ordered(rows: list[VersionInfo]) -> list[VersionInfo]:
    semver = sorted(
        (x for x in rows if x.version), key=lambda x: Version.parse(x.tag) or Version(0, 0, 0), reverse=True
    )
    others = sorted((x for x in rows if not x.version), key=lambda x: x.date or "", reverse=True)
    return semver + others


def _endpoint(api: HfApi | None) -> str:
    """The endpoint ``api`` (default: HF_ENDPOINT, else the Hub) talks to: whose tags an offline record must hold."""
    return str(get_api(api).endpoint)


def _versions_from_cache(repo_id: str, endpoint: str) -> list[VersionInfo]:
    """Offline ``versions``: the record of the tags last seen online, else the version tags the HF cache holds
    (``seen_at``: when that ref was cached)."""
    recorded = cache.read_versions(repo_id, endpoint=endpoint)
    if recorded is not None:
        return _ordered(recorded[1])
    refs_dir = cache.repo_dir(repo_id) / "refs"
    rows = []
    for name, commit in cache.read_refs(repo_id).items():
        v = Version.parse(name)
        if v is not None:
            seen = datetime.fromtimestamp((refs_dir / name).stat().st_mtime, UTC).isoformat(timespec="seconds")
            rows.append(
                VersionInfo(tag=name, version=str(v), commit=commit, date=None, title="", message="", seen_at=seen)
            )
    if not rows and not cache.repo_dir(repo_id).is_dir():
        raise HubError(
            f"the versions of {repo_id} are not in the local cache and offline mode is on (HF_HUB_OFFLINE=1)",
            repo_id=repo_id,
            hint=f"unset HF_HUB_OFFLINE, or run `adapters versions {repo_id}` (or pull it) once while online",
        )
    return _ordered(rows)


def _resolve_from_cache(ref: AdapterRef, endpoint: str) -> HfResolved:
    """Resolve ``ref`` from the HF cache alone (offline mode): its recorded refs and snapshot files, the blob each
    file links to giving its hash (:mod:`adapterhub_cli.stores.hf.cache` reads only checked names). Tags are those
    last seen online when recorded (so a ref without a revision means what it meant then), plus the cached refs."""
    assert ref.repo_id is not None
    names = cache.read_refs(ref.repo_id)
    recorded = cache.read_versions(ref.repo_id, endpoint=endpoint)
    seen = {r.tag: r.commit for r in recorded[1]} if recorded is not None else {}
    tags = {**seen, **{n: c for n, c in names.items() if n in seen or Version.parse(n) is not None}}
    rev, kind = ref.revision, ref.kind
    tag = latest_release(tags) if kind == "default" else pick_tag(tags, ref)
    branch = None
    if tag is None and kind == "name" and rev in names:
        branch = rev
    elif tag is None and kind == "default":
        branch = "main"
    commit = tags[tag] if tag else names.get(branch) if branch else rev if kind == "commit" else None
    snapshot = cache.snapshot_dir(ref.repo_id, commit) if commit is not None and SHA1.match(commit) else None
    note = resolution_note(kind, rev, tag, branch, tags)
    if commit is None or snapshot is None or not snapshot.is_dir():
        what = (
            ref.display
            if note is None
            else f"{ref.display} ({note}{f', as seen on {recorded[0]}' if recorded else ''})"
        )
        raise HubError(
            f"{what} is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1)",
            repo_id=ref.repo_id,
            revision=rev,
            hint="unset HF_HUB_OFFLINE, or pull it once while online",
        )
    files = {}
    for p in regular_files(snapshot):
        blob = p.resolve().name
        files[p.name] = RemoteFile(
            p.name,
            p.stat().st_size,
            blob if SHA256.match(blob) else None,
            blob if SHA1.match(blob) else None,
        )
    download = tag or branch or (rev if kind == "commit" else None)
    return HfResolved(HF, ref.repo_id, rev, commit, tag, files, branch=branch, note=note, download_revision=download)
