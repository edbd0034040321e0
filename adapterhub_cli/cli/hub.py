"""`adapters push`, `adapters pull`, `adapters versions`: versioned adapters in a store.

A store is the Hugging Face Hub (``org/name``, ``hf://org/name``), a local directory registry
(``file:///srv/adapters/org/name``) or one a plugin registers; all three commands work the same on each.
"""

from __future__ import annotations

import click

from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import allow_pickle_option, complete_paths, json_option, token_option
from adapterhub_cli.errors import scrub


@click.command("push")
@click.argument("path", shell_complete=complete_paths)
@click.argument("repo_id")
@click.option("--version", "version", required=True, help="Semantic version to publish, e.g. 1.3.0 (tagged v1.3.0).")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("-m", "--message", default=None, help="Commit and tag message.")
@click.option(
    "--force",
    is_flag=True,
    help="Publish a version lower than the latest release, or a model folder this tool did not write (a plain base "
    "checkpoint: carded as a merged model). An existing tag never moves.",
)
@click.option("--base-model", default=None, help="Hub id of the base for the card when the config names a local path.")
@token_option
@json_option
def push_cmd(
    path: str,
    repo_id: str,
    version: str,
    private: bool,
    message: str | None,
    force: bool,
    base_model: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Validate the adapter (or merged model) in PATH and publish it to REPO_ID as a new version.

    REPO_ID is a Hub repo (ORG/NAME: one commit tagged vVERSION) or a store repo such as
    file:///srv/adapters/ORG/NAME (a new immutable version folder). Checks the adapter alone and against its
    declared base when reachable and writes or updates the model card. A published version is never moved.
    """
    from adapterhub_cli import api

    with out.progress(f"pushing {path} to {repo_id}"):  # shown on terminals only
        result = api.push(
            path,
            repo_id,
            version=version,
            private=private,
            message=message,
            force=force,
            base_model=base_model,
            token=token,
        )
    if as_json:
        out.json(result.to_dict())
        return
    for w in result.warnings:
        out.warn(scrub(w))
    checked = f" (validated against {result.validated_against})" if result.validated_against else ""
    out.print(f"pushed {', '.join(result.files)}{checked}")
    out.print(f"commit {result.commit}")
    out.print(result.ref)


@click.command("pull")
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="OUT",
    shell_complete=complete_paths,
    help="Copy the files into this folder (default: leave them where the store keeps them, e.g. the HF cache).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@allow_pickle_option
@token_option
@json_option
def pull_cmd(
    ref: str, output: str | None, overwrite: bool, allow_pickle: bool, token: str | None, as_json: bool
) -> None:
    """Download an adapter (or merged model) at the version REF pins, hash-checked.

    REF is REPO_ID[@VERSION|@TAG|@BRANCH|@COMMIT|@latest|@^1.2|@~1.2], REPO_ID a Hub repo or a store repo
    (file:///srv/adapters/ORG/NAME). `latest` is the highest release, prereleases excluded; a bare REPO_ID is the
    latest release too (on the Hub: the default branch when the repo has no release tags). Prints the tag (or
    branch) and the commit it resolved to. Downloads only the files needed (safetensors; a .bin only with
    --allow-pickle), checks their sha256 against the store's record and records the pinned version in
    OUT/.adapters-pull.json.
    """
    from adapterhub_cli import api

    with out.progress(f"pulling {ref}"):  # shown on terminals only
        result = api.pull(ref, out=output, allow_pickle=allow_pickle, overwrite=overwrite, token=token)
    if as_json:
        out.json(result.to_dict())
        return
    t = out.table(None, "file", "sha256")
    for name, digest in result.files.items():
        t.add_row(name, digest)
    out.print(t)
    what = f"tag {result.tag}" if result.tag else f"branch {result.branch}" if result.branch else "commit"
    out.print(f"resolved {scrub(ref)} to {what}, commit {result.commit}")
    if result.note:
        out.print(f"  {result.note}")
    out.print(str(result.path))


@click.command("versions")
@click.argument("repo_id")
@token_option
@json_option
def versions_cmd(repo_id: str, token: str | None, as_json: bool) -> None:
    """List the published versions (tags) of REPO_ID (a Hub or store repo) with their ids, dates and messages.

    Offline (HF_HUB_OFFLINE=1) the Hub's versions come from the cache: as last seen online (by `versions` or a
    pull), and the output says when.
    """
    from adapterhub_cli import api

    rows = api.versions(repo_id, token=token)
    if as_json:
        out.json([v.to_dict() for v in rows])
        return
    seen = sorted({v.seen_at for v in rows if v.seen_at})
    if seen:
        when = seen[-1].replace("T", " ")
        out.warn(f"offline: cached data, the versions of {scrub(repo_id)} as seen online on {when}")
    if not rows:
        out.print(f"{repo_id} has no versions yet (push one with `adapters push PATH {repo_id} --version 0.1.0`)")
        return
    t = out.table(None, "tag", "commit", "date", "message", wrap_last=True)
    for v in rows:
        t.add_row(v.tag, v.commit[:12], (v.date or "-")[:19].replace("T", " "), v.message or v.title)
    out.print(t)
