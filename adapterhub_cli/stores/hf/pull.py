"""Files of a pinned Hub commit fetched into the HF cache and checked against the Hub's hashes.

The files a pull takes and the copy into a folder are the same for every store
(:mod:`adapterhub_cli.stores.publish`); what is the Hub's own is fetching through the HF cache, which serves
them again offline.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_cli.artifact.files import sha256_file
from adapterhub_cli.errors import CorruptFileError, HubError
from adapterhub_cli.stores.hf.client import connect, offline
from adapterhub_cli.stores.hf.resolve import SHA1


if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from adapterhub_cli.stores.records import Resolved, StoreFile


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _verified(path: Path, meta: StoreFile | None) -> str | None:
    """The local file's sha256 if it matches what the Hub reports (sha256 for LFS, git blob sha1 otherwise).

    The digest cache (keyed by file identity and modification time) spares rehashing a cached shard on every
    use; a fresh or re-downloaded file is a new file and is hashed again.
    """
    digest = sha256_file(path)
    if meta is None:
        return digest
    if meta.sha256 is not None:
        return digest if digest == meta.sha256 else None
    if meta.blob_id is not None and SHA1.match(meta.blob_id):
        return digest if git_blob_sha1(path) == meta.blob_id else None
    return digest


def fetch_file(resolved: Resolved, name: str, *, api: HfApi | None = None, token: str | None = None) -> Path:
    """Download one file of the pinned commit into the HF cache (or take it from there) and check its hash.

    Raises:
        CorruptFileError: the file's sha256 disagrees with the Hub's LFS metadata, even after a fresh download.
        HubError: the ref moved to another commit while downloading, or the download failed.
    """
    client = connect(resolved.repo_id, api, token)
    meta = resolved.files.get(name)
    revision = getattr(resolved, "download_revision", resolved.commit)
    for force in (False, True):
        path = Path(
            client.call(
                "downloading",
                "hf_hub_download",
                resolved.repo_id,
                name,
                revision=revision,
                shown=resolved.requested,
                filename=name,
                force_download=force,
                local_files_only=offline(),
            )
        )
        if path.parent.name != resolved.commit:
            raise HubError(
                f"{resolved.repo_id}@{revision} moved to commit {path.parent.name} while pulling {resolved.commit}",
                repo_id=resolved.repo_id,
                revision=resolved.requested,
                hint="pull again",
            )
        if _verified(path, meta) is not None:
            return path
    raise CorruptFileError(
        f"{name} of {resolved.pinned} does not match the Hub's sha256 {meta.sha256 if meta else ''} after a "
        "fresh download",
        path=path,
        hint="the file was altered in transit or in the cache; delete the cache entry and pull again",
    )
