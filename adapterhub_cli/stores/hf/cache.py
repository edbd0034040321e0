"""The huggingface_hub cache of one repo (``$HF_HUB_CACHE/models--ORG--NAME/``), read and written with checked
names only.

The layout is huggingface_hub's, so its own tools and offline mode read what is written here::

    blobs/<sha256 or git blob sha1>          the bytes
    snapshots/<commit>/<file name>           a relative symlink to its blob
    refs/<tag or branch>                     the commit it pointed to when fetched

Beside it, in this tool's own cache folder (``$ADAPTERS_CACHE/adapterhub_cli/hub-versions/``), the versions (tags)
of each repo as last listed online (:func:`record_versions`, :func:`read_versions`): what ``versions`` shows in
offline mode, and what a ref without a revision resolves against there. The record is scrubbed of secrets and
escape sequences when written and checked again when read (a record that fails is ignored).

Every name a path is built from is checked first, wherever it came from: the repo id by the ref grammar, commit
and blob ids as lowercase hex (:data:`SHA1`, :data:`SHA256`), file names as relative paths of plain names, ref
names as plain names. A blob is written to a fresh file (created exclusively, never through an existing link) and
renamed into place; a snapshot entry is replaced as a link, never written through; and the folders written into
must really lie inside the repo's cache folder. A snapshot entry is read only when it is a regular file whose
real path lies in the repo's ``blobs/`` or in its snapshot folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from adapterhub_cli.artifact.checkpoint import is_plain_name, is_relative_name
from adapterhub_cli.artifact.ref import is_name
from adapterhub_cli.errors import AdaptersError, HubResponseError, scrub, server_text
from adapterhub_cli.stores.records import VersionInfo


#: a git object id: a commit, or the blob sha1 the Hub gives for a file not in LFS
SHA1 = re.compile(r"^[0-9a-f]{40}\Z")
#: the sha256 the Hub gives for an LFS file (its blob name in the cache)
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def repo_dir(repo_id: str) -> Path:
    """``$HF_HUB_CACHE/models--ORG--NAME`` (``repo_id`` is a checked repo id: plain names only)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(repo_id: str, commit: str) -> Path:
    """``snapshots/<commit>`` of the repo's cache folder.

    Raises:
        HubResponseError: ``commit`` is not a 40-hex commit id.
    """
    if not SHA1.match(commit):
        raise HubResponseError(f"{commit[:80]!r} is not a commit id: no cache path is built from it", repo_id=repo_id)
    return repo_dir(repo_id) / "snapshots" / commit


def cached_file(repo_id: str, commit: str, name: str) -> Path | None:
    """The snapshot entry of file ``name`` at ``commit``: a regular file whose real path lies in the repo's
    ``blobs/`` or snapshot folder; None when there is none (or only something else: a dangling or outside link,
    a folder, a FIFO)."""
    if not is_relative_name(name):
        return None
    snapshot = snapshot_dir(repo_id, commit)
    path = snapshot / name
    roots = [snapshot.resolve(), (repo_dir(repo_id) / "blobs").resolve()]
    if not path.is_file() or not any(path.resolve().is_relative_to(root) for root in roots):
        return None
    return path


def store_file(
    repo_id: str,
    commit: str,
    name: str,
    blob_id: str,
    fill: Callable[[BinaryIO], None],
    check: Callable[[Path], None],
) -> Path:
    """Write a file into the cache: ``fill`` writes its bytes into a fresh temporary blob, ``check`` raises if they
    are wrong (then nothing is kept); the blob is renamed to ``blobs/<blob_id>`` and ``snapshots/<commit>/<name>``
    becomes a link to it. Returns the snapshot entry.

    Raises:
        HubResponseError: a name or id that is not safe to build a path from, or a cache folder that really lies
            outside the repo's cache folder (a link planted there).
    """
    if not (SHA1.match(blob_id) or SHA256.match(blob_id)) or not is_relative_name(name):
        raise HubResponseError(f"{name[:80]!r} ({blob_id[:80]!r}): no cache path is built from these", repo_id=repo_id)
    repo = repo_dir(repo_id)
    snapshot = snapshot_dir(repo_id, commit)
    pointer = snapshot / name
    blobs = repo / "blobs"
    for folder, inside in ((blobs, repo), (pointer.parent, snapshot)):
        folder.mkdir(parents=True, exist_ok=True)
        _require_inside(folder, inside, repo_id)
    blob = blobs / blob_id
    tmp = blobs / f"{blob_id}.{secrets.token_hex(8)}.incomplete"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        check(tmp)
        tmp.replace(blob)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _replace_link(pointer, os.path.relpath(blob, pointer.parent))
    return pointer


def write_ref(repo_id: str, ref: str | None, commit: str) -> None:
    """Record ``refs/<ref>`` -> ``commit`` (what offline mode resolves a tag or branch by); a ref that is not a
    plain name (``refs/pr/1``) or is a commit itself is not recorded."""
    if ref is None or not is_plain_name(ref) or SHA1.match(ref) or not SHA1.match(commit):
        return
    repo = repo_dir(repo_id)
    refs = repo / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    _require_inside(refs, repo, repo_id)
    tmp = refs / f".{ref}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "w") as f:
        f.write(commit)
    tmp.replace(refs / ref)


def read_refs(repo_id: str) -> dict[str, str]:
    """The recorded refs of the repo: name -> commit, only those whose file is a regular file holding a commit id."""
    refs = repo_dir(repo_id) / "refs"
    out = {}
    for p in sorted(refs.iterdir()) if refs.is_dir() else []:
        if is_plain_name(p.name) and p.is_file() and not p.is_symlink():
            commit = p.read_text(errors="replace").strip()
            if SHA1.match(commit):
                out[p.name] = commit
    return out


#: the largest versions record read (a repo with thousands of tags and long messages stays far below)
MAX_RECORD_BYTES = 4 << 20
_RECORD_TEXT_LIMIT = 4000


def versions_record(repo_id: str) -> Path | None:
    """Where the versions of ``repo_id`` seen online are recorded; None for a repo id that is not two plain names."""
    from adapterhub_cli.artifact.files import cache_root  # the one rule for this tool's cache folder

    org, _, name = repo_id.partition("/")
    if not (is_name(org) and is_name(name)):
        return None
    return cache_root() / "hub-versions" / f"models--{org}--{name}.json"


def record_versions(repo_id: str, rows: list[VersionInfo], *, endpoint: str) -> None:
    """Record ``rows`` (every tag of the repo as just listed online) for offline use. Rows without a date, title
    or message (a listing of refs alone) keep those of the previous record for the same tag and commit. Never
    fails: a cache that cannot be written only means offline ``versions`` has less to show."""
    path = versions_record(repo_id)
    if path is None:
        return
    previous = {r.tag: r for r in (read_versions(repo_id, endpoint=endpoint) or ("", []))[1]}
    tags: dict[str, dict[str, str | None]] = {}
    for r in rows:
        if not _recordable(r.tag, r.commit):
            continue  # the reader would refuse the whole record for it
        old = previous.get(r.tag)
        keep = old is not None and old.commit == r.commit and r.date is None
        tags[r.tag] = {
            "commit": r.commit,
            "date": old.date if keep and old else r.date,
            "title": (old.title if keep and old else r.title)[:_RECORD_TEXT_LIMIT],
            "message": (old.message if keep and old else r.message)[:_RECORD_TEXT_LIMIT],
        }
    from datetime import UTC, datetime

    doc = {
        "repo_id": repo_id,
        "endpoint": endpoint,
        "seen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tags": tags,
    }
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(scrub(json.dumps(doc, indent=1, sort_keys=True)) + "\n")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def same_endpoint(a: str, b: str) -> bool:
    """Whether two endpoint URLs name one server (a trailing slash and the case of scheme and host aside). A record
    stores its endpoint scrubbed (a password in it masked): compare it with the scrubbed live one."""
    from urllib.parse import urlsplit

    x, y = urlsplit(a.strip().rstrip("/")), urlsplit(b.strip().rstrip("/"))
    return (x.scheme.lower(), x.netloc.lower(), x.path) == (y.scheme.lower(), y.netloc.lower(), y.path)


def _recordable(tag: object, commit: object) -> bool:
    """Whether a tag and its commit may stand in a versions record: a tag of 1 to 256 characters that is its own
    server text (no control characters), a commit id."""
    return (
        isinstance(tag, str)
        and 0 < len(tag) <= 256
        and server_text(tag) == tag
        and isinstance(commit, str)
        and SHA1.match(commit) is not None
    )


def read_versions(repo_id: str, *, endpoint: str) -> tuple[str, list[VersionInfo]] | None:
    """(when it was seen online, the versions) from the record of ``repo_id``; None when there is none or it does
    not check out: a regular file of at most :data:`MAX_RECORD_BYTES`, this repo's as seen on ``endpoint`` (the
    same name on another server, a mirror or a private Hub, is another repo), every tag a string without control
    characters, every commit a commit id, every text a string (shown as server text)."""
    from adapterhub_cli.artifact.jsonsafe import parse_json
    from adapterhub_cli.artifact.ref import Version

    path = versions_record(repo_id)
    if path is None or path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
        return None
    try:
        doc = parse_json(path.read_bytes(), path=path, what="the cached versions record")
    except (OSError, AdaptersError):
        return None
    if not isinstance(doc, dict) or doc.get("repo_id") != repo_id or not isinstance(doc.get("tags"), dict):
        return None
    if not isinstance(doc.get("endpoint"), str) or not same_endpoint(doc["endpoint"], scrub(endpoint)):
        return None
    seen_at = doc.get("seen_at")
    if not isinstance(seen_at, str) or len(seen_at) > 64:
        return None
    rows = []
    for tag, entry in doc["tags"].items():
        if not isinstance(entry, dict):
            return None
        commit, date = entry.get("commit"), entry.get("date")
        texts = [entry.get("title"), entry.get("message")]
        if not _recordable(tag, commit) or not (date is None or isinstance(date, str)):
            return None
        assert isinstance(commit, str)  # _recordable checked it
        if not all(isinstance(t, str) and len(t) <= _RECORD_TEXT_LIMIT for t in texts):
            return None
        v = Version.parse(tag)
        rows.append(
            VersionInfo(
                tag=tag,
                version=str(v) if v else None,
                commit=commit,
                date=server_text(date)[:64] if date else None,
                title=server_text(texts[0]),
                message=server_text(texts[1]),
                seen_at=server_text(seen_at),
            )
        )
    return server_text(seen_at), rows


def _replace_link(pointer: Path, target: str) -> None:
    """Make ``pointer`` a symlink to ``target``, replacing what is there (a link is replaced, not written through)."""
    tmp = pointer.parent / f".{pointer.name}.{secrets.token_hex(8)}.link"
    tmp.symlink_to(target)
    try:
        tmp.replace(pointer)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _require_inside(folder: Path, root: Path, repo_id: str) -> None:
    if not folder.resolve().is_relative_to(root.resolve()):
        raise HubResponseError(
            f"the cache folder {folder} leads out of {root} (a link was planted there); nothing was written",
            repo_id=repo_id,
            hint="delete that repo's folder from the huggingface_hub cache and try again",
        )
