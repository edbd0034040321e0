"""Push and pull for every store, over the :class:`~adapterhub_cli.stores.base.Store` primitives.

Push: pick the files of an adapter folder or a merged-model folder (any layout of the checkpoint layout table,
a merged diffusers component included), validate the artifact (alone, and against its declared base when that
base is reachable: a local folder or any store's ref), check the version against the published ones, write
the card and :meth:`~Store.publish`. Pull: resolve, fetch the files an adapter or a model needs (each
verified by the store), and copy them atomically into a folder with a record of what was pinned.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.checkpoint import (
    CARD_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    file_inside,
    find_layout,
    is_relative_name,
    is_weight_file,
    regular_files,
    stays_inside,
)
from adapterhub_cli.artifact.files import atomic_dir, read_json, sha256_file
from adapterhub_cli.artifact.ref import AdapterRef, Version, is_repo_id, latest_release, require_version
from adapterhub_cli.errors import (
    CorruptFileError,
    InvalidAdapterError,
    StoreError,
    StoreNotFoundError,
    UsageError,
    VersionConflictError,
    scrub,
)
from adapterhub_cli.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from adapterhub_cli.stores.records import PullResult, PushResult
from adapterhub_cli.stores.registry import find_store
from adapterhub_cli.stores.views import select_files


if TYPE_CHECKING:
    from adapterhub_cli.stores.base import Store
    from adapterhub_cli.stores.records import Resolved

#: Written beside the files of ``pull(..., out=DIR)``: where they came from, the pinned version, their sha256.
PULL_RECORD = ".adapters-pull.json"


# --------------------------------------------------------------------------------------------------- push


def push_files(folder: Path) -> tuple[str, dict[str, Path]]:
    """(``adapter`` | ``merge``, the files to publish) for an adapter folder or a merged-model folder.

    A merged model is any checkpoint of the layout table (``model.safetensors``, a diffusers component's
    ``diffusion_pytorch_model.safetensors``, either sharded with its index) with its side files; weights in
    other formats and the card (written by the push) are left out. Only regular files inside the folder are
    published (:func:`~adapterhub_cli.artifact.checkpoint.regular_files`): a symlink leading out of it is not.

    Raises:
        InvalidAdapterError: not a folder, an adapter without safetensors weights, or neither.
        UnsafeFileError: an adapter's config or weights are not regular files inside the folder.
    """
    if not folder.is_dir():
        raise InvalidAdapterError("push takes a folder (an adapter or a merged model)", path=folder)
    config = file_inside(folder, CONFIG_NAME, what="adapter file")
    if config is not None:
        weights = file_inside(folder, WEIGHTS_NAME, what="adapter file")
        if weights is None:
            raise InvalidAdapterError(
                f"no {WEIGHTS_NAME} here (only safetensors adapters are published)",
                path=folder,
                hint="convert a legacy .bin by loading it with --allow-pickle and saving it with reduce / quantize",
            )
        return "adapter", {CONFIG_NAME: config, WEIGHTS_NAME: weights}
    names = [p.name for p in regular_files(folder)]
    if find_layout(names) is not None:
        files = {
            n: folder / n
            for n in names
            if not n.startswith(".") and n != CARD_FILE and (not is_weight_file(n) or n.endswith(".safetensors"))
        }
        return "merge", files
    raise InvalidAdapterError(
        f"neither an adapter ({CONFIG_NAME}) nor a merged model ({SINGLE_FILE} / {INDEX_FILE}, or a diffusers "
        "component's diffusion_pytorch_model.safetensors)",
        path=folder,
    )


def require_ours(folder: Path, kind: str, *, force: bool) -> list[str]:
    """Refuse, without ``force``, to push a model checkpoint this tool did not write: a folder that is not an
    adapter is published as a merged model, which a plain base checkpoint is not. Accepted: a folder written by
    ``adapters merge`` / ``unmerge`` (its :data:`~adapterhub_cli.artifact.files.OUTPUT_MARKER`, or provenance in
    a weight file's metadata) and one written by ``adapters pull`` (its :data:`PULL_RECORD`). Returns the warning
    a forced push carries.

    Raises:
        InvalidAdapterError: such a folder without ``force``.
    """
    from adapterhub_cli.artifact.files import OUTPUT_MARKER, is_earlier_output

    if kind != "merge" or is_earlier_output(folder) or pulled_from(folder) is not None:
        return []
    if any(is_earlier_output(p) for p in regular_files(folder) if p.name.endswith(".safetensors")):
        return []
    what = (
        f"a model checkpoint that neither `adapters merge` wrote (no {OUTPUT_MARKER}, no provenance "
        "in its weights) nor `adapters pull` fetched"
    )
    if not force:
        raise InvalidAdapterError(
            f"{what}: it would be published as a model merged with LoRA adapters",
            path=folder,
            hint="push an adapter folder or a folder written by `adapters merge`; to publish this checkpoint "
            "anyway, pass --force",
        )
    return [f"{what}; published anyway (--force), carded as a merged model"]


def local_card(folder: Path) -> str | None:
    """The card (README.md) of a folder to push, None when it has none.

    Raises:
        UnsafeFileError: README.md is not a regular file inside the folder (a symlink out of it is never read).
    """
    card = file_inside(folder, CARD_FILE, what="card")
    return card.read_text(errors="replace") if card is not None else None


def declared_repo_id(name: object) -> str | None:
    """``name`` if it reads as a Hub repo id without a revision (what a card's ``base_model`` may hold)."""
    if not isinstance(name, str) or not name:
        return None
    try:
        ref = AdapterRef.parse(name)
    except UsageError:
        return None
    return ref.repo_id if ref.is_hub and ref.revision is None and is_repo_id(ref.repo_id) else None


def validate_for_push(
    folder: Path, kind: str, *, options: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any], str | None, list[str]]:
    """Refuse a broken artifact: (adapter or None, model config, what it was validated against, warnings).

    ``options`` go to the store of the declared base (the Hub's ``api`` and ``token``).

    Raises:
        InvalidAdapterError, CorruptFileError, IncompatibleBaseError: the artifact is broken or misfits its base.
    """
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
    store = _store_of(declared)
    if declared and store is not None:
        ref = store.parse(declared)
        if ref.revision is None and adapter.config.revision:
            ref = ref.with_revision(adapter.config.revision)
        try:
            base = store.configured(**(options or {})).open_base(ref)
        except StoreError as e:
            warnings.append(f"the declared base {declared} is not reachable ({e}); validated the adapter alone")
    elif declared and Path(declared).exists():
        base = open_base(declared)
    elif declared:
        warnings.append(f"the declared base {declared} is neither a local folder nor a store ref; validated alone")
    require_valid(adapter, base=base)
    return adapter, dict(adapter.config.raw), (declared if base is not None else None), warnings


def _store_of(ref: str | None) -> Store | None:
    try:
        return find_store(ref) if ref else None
    except UsageError:  # an unknown scheme: not a base this push can reach
        return None


def check_version(repo: str, version: Version, tags: Mapping[str, str], force: bool) -> None:
    """Refuse a version that exists (never moved) or, without ``force``, one lower than the latest release
    (:func:`~adapterhub_cli.artifact.ref.latest_release`: prereleases never count as the latest).

    ``tags``: published tag or version name -> immutable id.

    Raises:
        VersionConflictError: as above.
    """
    if version.tag in tags or str(version) in tags:
        existing = version.tag if version.tag in tags else str(version)
        raise VersionConflictError(
            f"{repo}@{existing} already exists ({tags[existing][:12]}); published versions are never moved",
            repo_id=repo,
            revision=existing,
            hint="publish a new version number",
        )
    latest_tag = latest_release(tags)
    latest = Version.parse(latest_tag) if latest_tag is not None else None
    if latest is not None and version < latest and not force:
        raise VersionConflictError(
            f"version {version} is lower than the latest release {latest.tag} of {repo}",
            repo_id=repo,
            revision=version.tag,
            hint="pass --force to publish an older version line anyway",
        )


def push_folder(
    store: Store,
    source: str | Path,
    ref: str,
    *,
    version: str,
    message: str | None = None,
    force: bool = False,
    base_model: str | None = None,
) -> PushResult:
    """Validate the folder ``source``, card it and publish it to ``ref`` as ``version`` (see :meth:`Store.push`).

    Raises:
        UsageError: ``ref`` carries a revision, or ``version`` is not semver.
        VersionConflictError, InvalidAdapterError, IncompatibleBaseError, StoreError.
    """
    from adapterhub_cli.artifact.provenance import checkpoint_provenance
    from adapterhub_cli.stores.card import hub_card

    folder = Path(source)
    target = store.parse(ref)
    if target.revision is not None or target.repo_id is None:
        raise UsageError(f"push to a repo, not a revision: {ref}", hint="give the version with --version")
    v = require_version(version)
    kind, files = push_files(folder)
    foreign = require_ours(folder, kind, force=force)
    adapter, config, validated, warnings = validate_for_push(folder, kind)
    warnings = [*foreign, *warnings]
    try:
        published = {x.tag: x.commit for x in store.versions(target.repo_ref)}
    except StoreNotFoundError:
        published = {}
    check_version(target.display, v, published, force)
    existing = local_card(folder)
    if existing is None and published:
        existing = store.previous_card(target.repo_ref)
    card = hub_card(
        existing,
        adapter=adapter,
        config=config,
        relation=kind,
        base_model=base_model
        or declared_repo_id(config.get("base_model_name_or_path") or config.get("_name_or_path")),
        repo_id=target.repo_id,
        version=str(v),
        sha256={n: sha256_file(p) for n, p in files.items() if n.endswith(".safetensors")},
        repo_ref=None if target.is_hub else target.repo_ref,
        provenance=checkpoint_provenance(folder) if kind == "merge" else None,
    )
    result = store.publish(target.repo_ref, files, version=v, card=card, message=message, force=force)
    result.validated_against = validated
    result.warnings = [*warnings, *result.warnings]
    return result


# --------------------------------------------------------------------------------------------------- pull


def pull_version(
    store: Store,
    ref: str | AdapterRef,
    *,
    out: str | Path | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> PullResult:
    """Resolve ``ref`` and fetch only the adapter's (or model's) files, each verified by the store; with
    ``out``, copy them into that folder (atomically) with a :data:`PULL_RECORD` (see :meth:`Store.pull`)."""
    parsed = store.parse(ref)
    resolved = store.resolve(parsed)
    names = select_files(resolved, allow_pickle=allow_pickle)
    local = {n: _fetched(store, resolved, n) for n in names}
    hashes = {n: sha256_file(p) for n, p in local.items()}
    result = PullResult(
        local[names[-1]].parent,  # the weights' folder
        resolved.repo_id,
        parsed.revision,
        resolved.commit,
        resolved.tag,
        hashes,
        root=resolved.root,
        branch=resolved.branch,
        note=resolved.note,
    )
    if out is None:
        return result
    record = {
        "store": resolved.store,
        "repo_id": resolved.repo_id,
        "requested": str(parsed),
        "commit": resolved.commit,
        "tag": resolved.tag,
        "branch": resolved.branch,
        "uri": resolved.uri,
        "files": hashes,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for n, p in local.items():
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, tmp / n)
        (tmp / PULL_RECORD).write_text(scrub(json.dumps(record, indent=2, sort_keys=True)) + "\n")
    result.path = Path(out)
    return result


def _fetched(store: Store, resolved: Resolved, name: str) -> Path:
    """``store.fetch(resolved, name)``, refusing a name that is not a relative path of plain names or a fetched
    path that is not a regular file in its folder (a store's copy is never a link out of it).

    Raises:
        CorruptFileError: as above.
    """
    if not is_relative_name(name):
        raise CorruptFileError(f"{resolved.label} lists {name!r}, which is not a plain relative file name")
    path = store.fetch(resolved, name)
    if not stays_inside(path.parent, path):
        raise CorruptFileError(
            f"{name} of {resolved.label} is not a regular file in the store's copy",
            path=path,
            hint="the store's copy was altered; nothing was written",
        )
    return path


def pulled_from(folder: str | Path) -> str | None:
    """The ref that pins the version a folder written by a pull came from (``hf://org/name@<commit>``,
    ``file:///srv/adapters/org/name@<id>``), from its record; None for any other folder."""
    record = Path(folder) / PULL_RECORD
    if not record.is_file():
        return None
    try:
        doc = read_json(record, PULL_RECORD)
        return str(doc.get("uri") or f"hf://{doc['repo_id']}@{doc['commit']}")
    except (InvalidAdapterError, KeyError, TypeError):
        return None
