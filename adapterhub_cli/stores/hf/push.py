"""``push``: validate a local adapter (or merged model), card it, upload it in one commit and tag the version.

A version is a git tag (``v1.3.0``) that is never moved; a version lower than the latest needs ``force``.
A commit or tag whose answer was lost (the connection dropped after the Hub acted) is recognised on retry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.checkpoint import INDEX_FILE, SINGLE_FILE
from adapterhub_cli.artifact.files import sha256_file
from adapterhub_cli.artifact.ref import AdapterRef, Version, require_version
from adapterhub_cli.errors import HubError, InvalidAdapterError, UsageError, VersionConflictError
from adapterhub_cli.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from adapterhub_cli.stores.hf.client import CARD_NAME, WEIGHT_SUFFIXES, Client, as_hub_ref, connect


if TYPE_CHECKING:
    from huggingface_hub import HfApi


@dataclass
class PushResult:
    """What ``push`` published: ``ref`` (``org/name@v1.3.0``) names it from now on."""

    repo_id: str
    version: str
    tag: str
    commit: str
    ref: str
    url: str
    files: list[str]
    validated_against: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _push_files(folder: Path) -> tuple[str, dict[str, Path]]:
    """(``adapter`` | ``merge``, the files to upload) for an adapter folder or a merged-model folder."""
    if not folder.is_dir():
        raise InvalidAdapterError("push takes a folder (an adapter or a merged model)", path=folder)
    if (folder / CONFIG_NAME).is_file():
        if not (folder / WEIGHTS_NAME).is_file():
            raise InvalidAdapterError(
                f"no {WEIGHTS_NAME} here (only safetensors adapters are published)",
                path=folder,
                hint="convert a legacy .bin by loading it with --allow-pickle and saving it with reduce / quantize",
            )
        return "adapter", {CONFIG_NAME: folder / CONFIG_NAME, WEIGHTS_NAME: folder / WEIGHTS_NAME}
    if (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file():
        files = {
            p.name: p
            for p in sorted(folder.iterdir())
            if p.is_file()
            and not p.name.startswith(".")
            and p.name != CARD_NAME
            and (not p.name.endswith(WEIGHT_SUFFIXES) or p.suffix == ".safetensors")
        }
        return "merge", files
    raise InvalidAdapterError(
        f"neither an adapter ({CONFIG_NAME}) nor a merged model ({SINGLE_FILE} / {INDEX_FILE})", path=folder
    )


def _hub_id(name: object) -> str | None:
    """``name`` if it reads as a Hub repo id (not a local path), else None."""
    if not isinstance(name, str) or not name:
        return None
    try:
        ref = AdapterRef.parse(name)
    except UsageError:
        return None
    return ref.repo_id if ref.is_hub and ref.revision is None else None


def _validate_for_push(folder: Path, kind: str, client: Client) -> tuple[Any, dict[str, Any], str | None, list[str]]:
    """Refuse a broken artifact: (adapter or None, model config, what it was validated against, warnings)."""
    from adapterhub_cli.artifact.checkpoint import open_base
    from adapterhub_cli.artifact.preflight import require_valid
    from adapterhub_cli.formats import get_format

    if kind == "merge":
        view = open_base(folder)  # checks every shard header and the index
        return None, view.config, None, []
    adapter = get_format("peft").read(folder)
    declared = adapter.config.base_model_name_or_path
    warnings: list[str] = []
    base: Any = None
    if declared and Path(declared).exists():
        base = open_base(declared)
    elif (repo := _hub_id(declared)) is not None:
        from adapterhub_cli.stores.hf.remote import open_remote_base

        try:
            base = open_remote_base(
                AdapterRef(repo_id=repo, revision=adapter.config.revision), api=client.api, token=client.token
            )
        except HubError as e:
            warnings.append(f"the declared base {declared} is not reachable ({e}); validated the adapter alone")
    elif declared:
        warnings.append(f"the declared base {declared} is neither a local folder nor a Hub repo; validated alone")
    require_valid(adapter, base=base)
    return adapter, dict(adapter.config.raw), (declared if base is not None else None), warnings


def _check_version(repo_id: str, version: Version, tags: dict[str, str], force: bool) -> None:
    if version.tag in tags or str(version) in tags:
        existing = version.tag if version.tag in tags else str(version)
        raise VersionConflictError(
            f"{repo_id}@{existing} already exists (commit {tags[existing][:12]}); published versions are never moved",
            repo_id=repo_id,
            revision=existing,
            hint="publish a new version number",
        )
    releases = [v for t in tags if (v := Version.parse(t)) is not None]
    latest = max(releases, default=None)
    if latest is not None and version < latest and not force:
        raise VersionConflictError(
            f"version {version} is lower than the latest published {latest.tag} of {repo_id}",
            repo_id=repo_id,
            revision=version.tag,
            hint="pass --force (force=True) to publish an older version line anyway",
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
    from adapterhub_cli.stores.hf.card import hub_card

    folder = Path(source)
    target = as_hub_ref(repo_id)
    if target.revision is not None or target.repo_id is None:
        raise UsageError(f"push to a repo id, not a revision: {repo_id}", hint="give the version with --version")
    repo_id = target.repo_id
    v = require_version(version)
    kind, files = _push_files(folder)
    client = connect(repo_id, api, token)
    adapter, config, validated, warnings = _validate_for_push(folder, kind, client)
    client.call("creating", "create_repo", repo_id, private=private, exist_ok=True)
    refs = client.call("listing the refs of", "list_repo_refs", repo_id)
    _check_version(repo_id, v, {t.name: t.target_commit for t in refs.tags}, force)
    head = client.call("reading", "model_info", repo_id, files_metadata=False)
    existing = (folder / CARD_NAME).read_text() if (folder / CARD_NAME).is_file() else None
    if existing is None and any(s.rfilename == CARD_NAME for s in head.siblings or []):
        existing = _remote_card(client, repo_id, head.sha)
    declared = _hub_id(config.get("base_model_name_or_path") or config.get("_name_or_path"))
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
    title = f"adapters push {v.tag}"
    commit = _commit(client, repo_id, files, card, title, message or "", head.sha)
    tag_message = message or f"{repo_id} {v.tag}"
    _tag(client, repo_id, v.tag, commit, tag_message)
    return PushResult(
        repo_id=repo_id,
        version=str(v),
        tag=v.tag,
        commit=commit,
        ref=f"{repo_id}@{v.tag}",
        url=f"{client.api.endpoint}/{repo_id}/tree/{v.tag}",
        files=[*files, CARD_NAME],
        validated_against=validated,
        warnings=warnings,
    )


def _remote_card(client: Client, repo_id: str, commit: str) -> str | None:
    path = client.call("downloading", "hf_hub_download", repo_id, CARD_NAME, revision=commit, filename=CARD_NAME)
    return Path(path).read_text(errors="replace")


def _commit(
    client: Client, repo_id: str, files: dict[str, Path], card: str, title: str, description: str, parent: str
) -> str:
    """One commit with every file; a retried commit that in fact landed is recognised (412 + same title)."""
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in files.items()]
    ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
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
        return str(info.oid)
    except HubError as e:
        if e.status != 412:
            raise
        latest = client.call("listing the commits of", "list_repo_commits", repo_id)
        if latest and latest[0].title == title and len(latest) > 1 and latest[1].commit_id == parent:
            return str(latest[0].commit_id)  # our own commit, whose answer was lost before a retry
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
        refs = client.call("listing the refs of", "list_repo_refs", repo_id)
        if any(t.name == tag and t.target_commit == commit for t in refs.tags):
            return  # our own tag, whose answer was lost before a retry
        raise VersionConflictError(
            f"{repo_id}@{tag} was created by someone else while pushing; commit {commit[:12]} is untagged",
            repo_id=repo_id,
            revision=tag,
            status=409,
            hint="publish a new version number",
        ) from e
