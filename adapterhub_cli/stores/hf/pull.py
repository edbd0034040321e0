"""Files of a pinned Hub commit fetched into the HF cache and checked against the Hub's hashes.

The files a pull takes and the copy into a folder are the same for every store
(:mod:`adapterhub_cli.stores.publish`); what is the Hub's own is fetching through the HF cache, which serves
them again offline. A file is downloaded at the pinned commit by one GET cut off at the size the Hub's listing
gives it (:func:`adapterhub_cli.stores.hf.remote.get`), checked against the listed sha256 (LFS) or git blob sha1
before it is kept, and stored under names checked by :mod:`adapterhub_cli.stores.hf.cache`, never through a link.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from adapterhub_cli.artifact.files import sha256_file
from adapterhub_cli.errors import CorruptFileError, HubError, HubNotFoundError, HubResponseError
from adapterhub_cli.stores.hf import cache, remote
from adapterhub_cli.stores.hf.client import Client, connect, offline


if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from adapterhub_cli.stores.records import Resolved, StoreFile

_CHUNK = 8 << 20


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub lists for a file not in LFS)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, meta: StoreFile) -> bool:
    """Whether the local file is what the Hub lists: its size, and its sha256 (LFS) or git blob sha1."""
    if meta.size is not None and path.stat().st_size != meta.size:
        return False
    if meta.sha256 is not None:
        return sha256_file(path) == meta.sha256
    return meta.blob_id is not None and git_blob_sha1(path) == meta.blob_id


def fetch_file(resolved: Resolved, name: str, *, api: HfApi | None = None, token: str | None = None) -> Path:
    """One file of the pinned commit from the HF cache when it is there and verified, else downloaded into it.

    Raises:
        HubNotFoundError: the commit lists no such file.
        CorruptFileError: the downloaded bytes disagree with the Hub's hash (nothing is kept).
        HubResponseError: the server sent more than listed, or a name or id unsafe for a path.
        HubError: offline mode and the file is not cached, or the download failed.
    """
    meta = resolved.files.get(name)
    if meta is None:
        raise HubNotFoundError(
            f"{name} is not a file of {resolved.label}", repo_id=resolved.repo_id, revision=resolved.requested
        )
    cached = cache.cached_file(resolved.repo_id, resolved.commit, name)
    if cached is not None and _verified(cached, meta):
        return cached
    if offline():
        raise HubError(
            f"{name} of {resolved.label} is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1)",
            repo_id=resolved.repo_id,
            revision=resolved.requested,
            hint="unset HF_HUB_OFFLINE, or pull it once while online",
        )
    client = connect(resolved.repo_id, api, token)
    path = download(client, resolved.repo_id, resolved.commit, meta, shown=resolved.requested)
    cache.write_ref(resolved.repo_id, getattr(resolved, "download_revision", None), resolved.commit)
    return path


def download(client: Client, repo_id: str, commit: str, meta: StoreFile, *, shown: str | None = None) -> Path:
    """Download file ``meta.name`` of ``commit`` into the HF cache, at most ``meta.size`` bytes, and keep it only
    when it matches the listed hash.

    Raises:
        HubResponseError: the listing gives no size or hash to check against, or the server sent more.
        CorruptFileError: the bytes disagree with the listed hash.
    """
    blob_id = meta.sha256 or meta.blob_id
    if blob_id is None or meta.size is None:
        raise HubResponseError(
            f"the Hub's listing of {repo_id}@{commit} gives {meta.name} no size or hash to check a download against",
            repo_id=repo_id,
            revision=shown,
        )

    def fill(out: BinaryIO) -> None:
        remote.get(client, repo_id, commit, meta.name, out, limit=meta.size, shown=shown)

    def check(path: Path) -> None:
        if not _verified(path, meta):
            raise CorruptFileError(
                f"{meta.name} of {repo_id}@{commit} does not match the Hub's "
                + (f"sha256 {meta.sha256}" if meta.sha256 else f"git blob id {meta.blob_id}")
                + f" ({meta.size} bytes) after a fresh download",
                path=Path(f"{repo_id}@{commit}") / meta.name,
                hint="the file was altered in transit or on the server; nothing was kept",
            )

    return cache.store_file(repo_id, commit, meta.name, blob_id, fill, check)
