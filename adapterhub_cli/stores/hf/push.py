"""``push``: validate a local adapter (or merged model), card it, upload it in one commit and tag the version.

A version is a git tag (``v1.3.0``) that is never moved; a version lower than the latest needs ``force``.
A commit or tag whose answer was lost (the connection dropped after the Hub acted) is recognised on retry.
Which files go up and how the artifact is validated is the same for every store
(:mod:`adapterhub_cli.stores.publish`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.checkpoint import CARD_FILE
from adapterhub_cli.artifact.files import sha256_file
from adapterhub_cli.artifact.ref import Version, hub_ref, require_version
from adapterhub_cli.errors import HubError, UsageError, VersionConflictError
from adapterhub_cli.stores.hf.client import Client, connect
from adapterhub_cli.stores.hf.pull import download
from adapterhub_cli.stores.hf.resolve import commit_id, listed_files, repo_refs
from adapterhub_cli.stores.publish import (
    check_version,
    declared_repo_id,
    local_card,
    push_files,
    require_ours,
    validate_for_push,
)
from adapterhub_cli.stores.records import PushResult


if TYPE_CHECKING:
    from huggingface_hub import HfApi


def open_repo(client: Client, repo_id: str, version: Version, *, force: bool, private: bool) -> Any:
    """Create the repo if needed, refuse a version that exists or (without ``force``) is lower than the latest,
    and return the head's ``model_info`` (its commit is the parent of the push's commit)."""
    client.call("creating", "create_repo", repo_id, private=private, exist_ok=True)
    tags, _ = repo_refs(client, repo_id)
    check_version(repo_id, version, tags, force)
    head = client.call("reading", "model_info", repo_id, files_metadata=True)
    commit_id(head.sha, what="the head commit", repo_id=repo_id)
    return head


def remote_card(client: Client, repo_id: str, head: Any) -> str | None:
    """The README.md at the head commit (a ``model_info(..., files_metadata=True)`` answer), if the repo has one:
    downloaded as any file is (its listed size at most, hash-checked)."""
    meta = listed_files(head, repo_id).get(CARD_FILE)
    if meta is None:
        return None
    path = download(client, repo_id, commit_id(head.sha, what="the head commit", repo_id=repo_id), meta)
    return path.read_text(errors="replace")


def publish(
    client: Client,
    repo_id: str,
    files: Mapping[str, Path],
    *,
    version: Version,
    card: str | None,
    head: Any,
    message: str | None = None,
) -> PushResult:
    """``files`` and ``card`` in one commit on ``head``, tagged ``version.tag``."""
    title = f"adapters push {version.tag}"
    commit = _commit(client, repo_id, files, card, title, message or "", head.sha)
    _tag(client, repo_id, version.tag, commit, message or f"{repo_id} {version.tag}")
    return PushResult(
        repo_id=repo_id,
        version=str(version),
        tag=version.tag,
        commit=commit,
        ref=f"{repo_id}@{version.tag}",
        url=f"{client.api.endpoint}/{repo_id}/tree/{version.tag}",
        files=[*files, *([CARD_FILE] if card is not None else [])],
    )


def push(
    source: str | Path,
    repo_id: str,
    *,
    version: str,
    api: HfApi | None = None,
    token: str | None = None,
    private: bool = False,
    message: str | None = None,
    force: bool = False,
    base_model: str | None = None,
) -> PushResult:
    """Validate a local adapter (or merged model), then publish it to ``repo_id`` as version ``version``.

    The adapter is checked alone (ranks, NaN / inf) and against its declared base when that base is
    reachable (a local folder or a Hub repo). The model card (README.md) is written or updated with Hub
    metadata and the lineage; config, safetensors and card go up in one commit, which is tagged ``v{version}``.

    Args:
        version: semver ``MAJOR.MINOR.PATCH``; an existing tag is never moved, and a version lower than the
            latest is refused unless ``force``.
        base_model: the Hub id of the base for the card, when the config names a local path.

    Raises:
        VersionConflictError, InvalidAdapterError, IncompatibleBaseError, HubAuthError, HubError.
    """
    from adapterhub_cli.stores.card import hub_card

    folder = Path(source)
    target = hub_ref(repo_id)
    if target.revision is not None or target.repo_id is None:
        raise UsageError(f"push to a repo id, not a revision: {repo_id}", hint="give the version with --version")
    repo_id = target.repo_id
    v = require_version(version)
    kind, files = push_files(folder)
    foreign = require_ours(folder, kind, force=force)
    client = connect(repo_id, api, token)
    adapter, config, validated, warnings = validate_for_push(folder, kind, options={"api": client.api, "token": token})
    warnings = [*foreign, *warnings]
    head = open_repo(client, repo_id, v, force=force, private=private)
    existing = local_card(folder)
    if existing is None:
        existing = remote_card(client, repo_id, head)
    declared = declared_repo_id(config.get("base_model_name_or_path") or config.get("_name_or_path"))
    card = hub_card(
        existing,
        adapter=adapter,
        config=config,
        relation=kind,
        base_model=base_model or declared,
        repo_id=repo_id,
        version=str(v),
        sha256={n: sha256_file(p) for n, p in files.items() if n.endswith(".safetensors")},
    )
    result = publish(client, repo_id, files, version=v, card=card, head=head, message=message)
    result.validated_against = validated
    result.warnings = warnings
    return result


def _commit(
    client: Client,
    repo_id: str,
    files: Mapping[str, Path],
    card: str | None,
    title: str,
    description: str,
    parent: str,
) -> str:
    """One commit with every file; a retried commit that in fact landed is recognised (412 + same title)."""
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in files.items()]
    if card is not None:
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
    try:
        info = client.call(
            "pushing to",
            "create_commit",
            repo_id,
            operations=ops,
            commit_message=title,
            commit_description=description or None,
            parent_commit=parent,
        )
        return commit_id(info.oid, what="the new commit", repo_id=repo_id)
    except HubError as e:
        if e.status != 412:
            raise
        latest = client.call("listing the commits of", "list_repo_commits", repo_id)
        if latest and latest[0].title == title and len(latest) > 1 and latest[1].commit_id == parent:
            return commit_id(latest[0].commit_id, what="the new commit", repo_id=repo_id)  # ours, its answer lost
        raise VersionConflictError(
            f"{repo_id} changed while pushing (someone else committed); nothing was tagged",
            repo_id=repo_id,
            status=412,
            hint="push again",
        ) from e


def _tag(client: Client, repo_id: str, tag: str, commit: str, message: str) -> None:
    try:
        client.call("tagging", "create_tag", repo_id, tag=tag, revision=commit, tag_message=message)
    except HubError as e:
        if e.status != 409:
            raise
        if repo_refs(client, repo_id)[0].get(tag) == commit:
            return  # our own tag, whose answer was lost before a retry
        raise VersionConflictError(
            f"{repo_id}@{tag} was created by someone else while pushing; commit {commit[:12]} is untagged",
            repo_id=repo_id,
            revision=tag,
            status=409,
            hint="publish a new version number",
        ) from e
