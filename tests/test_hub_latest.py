"""A command line that keeps its word on the Hub (issue 14), against the local Hub-compatible server.

One meaning of "latest" (the highest release, prereleases excluded) in push's version check, ``@latest`` and a
ref without a revision, in the Hub and the local registry alike, and every pull saying what it resolved to;
``tests/hub_server.py`` as a command (``--help``, ``--port``, ``--token``) and the 401 a push without a token gets;
offline ``versions`` served from the tags seen online; a push of a checkpoint this tool did not write needing
``--force``; and the API printing nothing (no huggingface_hub progress bars), the CLI no bars when piped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import run_cli
from hub_server import FakeHub, point_at, serving

import adapterhub_cli as ah
from adapterhub_cli.artifact.ref import AdapterRef, latest_release, pick_tag
from adapterhub_cli.errors import HubAuthError, HubError, HubNotFoundError, StoreNotFoundError, VersionConflictError
from adapterhub_cli.stores.hf import cache as hub_cache
from adapterhub_cli.stores.publish import check_version


TOKEN = "hf_latest_test_token_5c0ffee"
SERVER = Path(__file__).with_name("hub_server.py")

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with serving(monkeypatch, tokens={TOKEN}, token=TOKEN) as server:
        yield server


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------------------------- one meaning of latest


def test_latest_is_the_highest_release_everywhere() -> None:
    tags = ["v1.0.0", "v1.1.0", "v2.0.0-rc.1", "stable", "1.1.0"]
    assert latest_release(tags) == "v1.1.0"  # the prerelease is higher but never the latest
    assert latest_release(["v2.0.0-rc.1", "main"]) is None
    assert pick_tag(tags, AdapterRef.parse("org/x@latest")) == "v1.1.0"
    assert pick_tag(tags, AdapterRef.parse("org/x@2.0.0-rc.1")) == "v2.0.0-rc.1"  # named exactly: found
    published = {"v1.0.0": "a" * 40, "v2.0.0-rc.1": "b" * 40}
    check_version("org/x", ah_version("1.1.0"), published, force=False)  # above the latest release: fine
    with pytest.raises(VersionConflictError, match=r"lower than the latest release v1\.0\.0"):
        check_version("org/x", ah_version("0.9.0"), published, force=False)


def test_hostile_tag_names_never_pass_for_a_version() -> None:
    # a server's tag is taken as a version only when it is exactly one: padding or a newline is not forgiven
    hostile = ["v1.0.0", "v9.0.0\n", " v8.0.0", "v7.0.0 ", "latest-v6.0.0"]
    assert latest_release(hostile) == "v1.0.0"
    assert pick_tag(hostile, AdapterRef.parse("org/x@^9")) is None
    assert pick_tag(hostile, AdapterRef.parse("org/x@8.0.0")) is None
    # a tag named "latest" (which may point anywhere) does not change what @latest means
    assert pick_tag(["v1.0.0", "latest", "v2.0.0-rc.1"], AdapterRef.parse("org/x@latest")) == "v1.0.0"
    # a range breaks a tie the way latest does: the v tag
    assert pick_tag(["1.2.0", "v1.2.0"], AdapterRef.parse("org/x@^1")) == "v1.2.0"
    # so does a version that names neither tag exactly (build metadata); a tag named exactly is that tag
    assert pick_tag(["1.2.0", "v1.2.0"], AdapterRef.parse("org/x@1.2.0+build.5")) == "v1.2.0"
    assert pick_tag(["1.2.0", "v1.2.0"], AdapterRef.parse("org/x@1.2.0")) == "1.2.0"


def ah_version(text: str):  # type: ignore[no-untyped-def]
    from adapterhub_cli.artifact.ref import require_version

    return require_version(text)


def test_hub_latest_bare_ref_and_push_check_agree(hub: FakeHub, llama_lora: Path, llama_rslora: Path) -> None:
    v1 = ah.push(llama_lora, "org/lora", version="1.0.0")
    rc = ah.push(llama_rslora, "org/lora", version="2.0.0-rc.1")
    v11 = ah.push(llama_lora, "org/lora", version="1.1.0")  # was refused: "lower than the latest 2.0.0-rc.1"
    with pytest.raises(VersionConflictError, match=r"lower than the latest release v1\.1\.0"):
        ah.push(llama_lora, "org/lora", version="1.0.1")
    assert v1.commit != v11.commit != rc.commit

    latest = ah.pull("org/lora@latest")
    bare = ah.pull("org/lora")  # was the default branch, whatever was pushed last, without saying so
    assert (latest.tag, latest.commit) == ("v1.1.0", v11.commit)
    assert (bare.tag, bare.commit, bare.branch) == ("v1.1.0", v11.commit, None)
    assert bare.note == "the latest release v1.1.0 (no version was given)"
    assert ah.pull("org/lora@2.0.0-rc.1").commit == rc.commit  # a prerelease named exactly
    assert ah.pull("org/lora@^1").commit == v11.commit

    r = run_cli("pull", "org/lora")
    assert r.exit_code == 0, r.output
    assert f"resolved org/lora to tag v1.1.0, commit {v11.commit}" in r.output
    assert "the latest release v1.1.0 (no version was given)" in r.output
    r = run_cli("pull", "org/lora@latest", "--json")
    doc = json.loads(r.output)
    assert (doc["tag"], doc["commit"], doc["note"]) == (
        "v1.1.0",
        v11.commit,
        "the latest release v1.1.0 (prereleases excluded)",
    )


def test_a_bare_ref_without_release_tags_takes_the_default_branch_and_says_so(
    hub: FakeHub, llama_lora: Path, llama_rslora: Path
) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("org/untagged")
    api.upload_folder(folder_path=str(llama_lora), repo_id="org/untagged", allow_patterns=["adapter_*"])
    pulled = ah.pull("org/untagged")
    main = api.model_info("org/untagged").sha
    assert (pulled.tag, pulled.branch, pulled.commit) == (None, "main", main)
    assert pulled.note == "the default branch main (no version tags)"
    r = run_cli("pull", "org/untagged")
    assert r.exit_code == 0, r.output
    assert f"resolved org/untagged to branch main, commit {main}" in r.output and "no version tags" in r.output
    with pytest.raises(HubNotFoundError, match="no version of org/untagged matches 'latest'"):
        ah.pull("org/untagged@latest")

    rc = ah.push(llama_rslora, "org/pre", version="0.1.0-rc.1")
    only_pre = ah.pull("org/pre")
    assert (only_pre.commit, only_pre.branch, only_pre.tag) == (rc.commit, "main", None)
    assert only_pre.note == "the default branch main (no release tags, only prereleases: v0.1.0-rc.1)"
    with pytest.raises(HubNotFoundError, match="prereleases excluded"):
        ah.pull("org/pre@latest")


def test_local_registry_latest_has_the_same_meaning(tmp_path: Path, llama_lora: Path, llama_rslora: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    repo = f"file://{root}/acme/lora"
    ah.push(llama_lora, repo, version="1.0.0")
    ah.push(llama_rslora, repo, version="2.0.0-rc.1")
    v11 = ah.push(llama_lora, repo, version="1.1.0")  # above the latest release: no --force needed
    bare = ah.pull(repo)
    assert (bare.tag, bare.commit, bare.note) == (
        "v1.1.0",
        v11.commit,
        "the latest release v1.1.0 (no version was given)",
    )
    assert ah.pull(f"{repo}@latest").tag == "v1.1.0"
    r = run_cli("pull", repo, "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert f"resolved {repo} to tag v1.1.0, commit {v11.commit}" in r.output

    pre = f"file://{root}/acme/pre"
    ah.push(llama_lora, pre, version="0.1.0-rc.1")
    with pytest.raises(StoreNotFoundError, match="prereleases excluded") as info:
        ah.pull(pre)  # was: the highest prerelease, silently
    assert info.value.hint is not None and "@v0.1.0-rc.1" in info.value.hint
    assert ah.pull(f"{pre}@0.1.0-rc.1").tag == "v0.1.0-rc.1"


def test_inspect_of_a_hub_ref_shows_the_commit(hub: FakeHub, llama_lora: Path) -> None:
    pushed = ah.push(llama_lora, "org/lora", version="1.0.0")
    r = run_cli("inspect", "org/lora", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["pinned"] == f"hf://org/lora@{pushed.commit}" and doc["path"] == "org/lora@v1.0.0"
    r = run_cli("inspect", "org/lora@v1.0.0")
    assert r.exit_code == 0, r.output
    assert re.search(rf"pinned\s+hf://org/lora@{pushed.commit}", r.output)
    assert json.loads(run_cli("inspect", str(llama_lora), "--json").output)["pinned"] is None  # a local folder


# ------------------------------------------------------------------------------------ the test server, 401s


def test_hub_server_help_and_bad_port() -> None:
    done = subprocess.run([sys.executable, str(SERVER), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout and "--token" in done.stdout and "--port" in done.stdout
    done = subprocess.run([sys.executable, str(SERVER), "--port", "70000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a port number" in done.stderr
    done = subprocess.run([sys.executable, str(SERVER), "--token", ""], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--token is empty" in done.stderr  # never a server that accepts any token


@pytest.fixture
def token_server() -> Iterator[tuple[str, int]]:
    """``python tests/hub_server.py --port PORT --token TOKEN`` as a process; (its URL, the port asked for)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", str(port), "--token", TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        m = re.search(r"HF_ENDPOINT=(http://127\.0\.0\.1:\d+)\b", "".join(lines))
        assert m is not None, lines
        yield m[1], port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_hub_server_token_accepts_only_that_token(
    token_server: tuple[str, int], monkeypatch: pytest.MonkeyPatch, llama_lora: Path
) -> None:
    url, port = token_server
    assert url == f"http://127.0.0.1:{port}"
    point_at(monkeypatch, url, token=None)
    with pytest.raises(HubAuthError, match=r"401.*no token was sent") as info:
        ah.push(llama_lora, "org/lora", version="1.0.0")
    assert info.value.hint is not None and "HF_TOKEN or pass --token" in info.value.hint
    with pytest.raises(HubAuthError, match=r"refused the credentials \(401"):
        ah.push(llama_lora, "org/lora", version="1.0.0", token="hf_wrong_token_000000")
    pushed = ah.push(llama_lora, "org/lora", version="1.0.0", token=TOKEN)
    assert ah.pull("org/lora", token=TOKEN).commit == pushed.commit
    with pytest.raises(HubAuthError, match="no token was sent"):  # reads need the token too
        ah.versions("org/lora")


@pytest.mark.parametrize("anonymous", [True, False])
def test_push_without_a_token_is_a_401_not_a_missing_repo(
    monkeypatch: pytest.MonkeyPatch, llama_lora: Path, anonymous: bool
) -> None:
    with serving(monkeypatch, tokens={TOKEN}, token=None, anonymous=anonymous):
        with pytest.raises(HubAuthError, match="401") as info:
            ah.push(llama_lora, "org/lora", version="1.0.0")
        assert not isinstance(info.value, HubNotFoundError) and info.value.status == 401
        r = run_cli("push", str(llama_lora), "org/lora", "--version", "1.0.0")
        assert r.exit_code != 0
        assert "the Hub refused the credentials (401" in r.output and "set HF_TOKEN or pass --token" in r.output
        assert "not found" not in r.output
        r = run_cli("push", str(llama_lora), "org/lora", "--version", "1.0.0", "--token", "hf_bad_token_1234567")
        assert r.exit_code != 0 and "401" in r.output and "no token was sent" not in r.output
        assert "hf_bad_token_1234567" not in r.output


# -------------------------------------------------------------------------------------------- offline versions


def test_offline_versions_are_served_from_the_tags_seen_online(
    hub: FakeHub, llama_lora: Path, llama_rslora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = ah.push(llama_lora, "org/lora", version="1.0.0", message="first")
    v11 = ah.push(llama_rslora, "org/lora", version="1.1.0", message="second")
    for _ in range(2):
        ah.pull("org/lora@v1.0.0")  # a pull records the tags it saw; `versions` was never run online
    with monkeypatch.context() as m:
        go_offline(m)
        before = len(hub.requests)
        rows = ah.versions("org/lora")
        assert [(r.tag, r.commit) for r in rows] == [("v1.1.0", v11.commit), ("v1.0.0", v1.commit)]
        assert all(r.seen_at for r in rows)
        r = run_cli("versions", "org/lora")
        assert r.exit_code == 0, r.output
        assert "cached data" in r.output and "as seen online on" in r.output and "v1.1.0" in r.output
        assert len(hub.requests) == before  # not one request
        with pytest.raises(HubError, match=r"the latest release v1\.1\.0.*not in the local cache"):
            ah.pull("org/lora")  # what a bare ref meant online, though only v1.0.0 is cached
        with pytest.raises(HubError, match="not in the local cache"):
            ah.versions("org/never-seen")

    online = ah.versions("org/lora")  # records dates and messages too
    assert online[0].seen_at is None
    ah.pull("org/lora")
    with monkeypatch.context() as m:
        go_offline(m)
        rows = ah.versions("org/lora")
        assert [(r.tag, r.message) for r in rows] == [("v1.1.0", "second"), ("v1.0.0", "first")]
        bare = ah.pull("org/lora")
        assert (bare.tag, bare.commit) == ("v1.1.0", v11.commit) and bare.note is not None

    record = hub_cache.versions_record("org/lora")
    assert record is not None and record.is_file() and TOKEN not in record.read_text()
    doc = json.loads(record.read_text())
    doc["tags"]["v1.1.0"]["commit"] = "../../etc/passwd"
    record.write_text(json.dumps(doc))
    with monkeypatch.context() as m:
        go_offline(m)
        rows = ah.versions("org/lora")  # a record that does not check out is ignored: the cached refs remain
        assert {r.tag for r in rows} == {"v1.0.0", "v1.1.0"} and all(len(r.commit) == 40 for r in rows)
        assert "../../etc/passwd" not in json.dumps([r.to_dict() for r in rows])


def test_a_versions_record_keeps_what_it_can_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterhub_cli.stores.records import VersionInfo

    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))

    def row(tag: str, commit: str = "a" * 40) -> VersionInfo:
        return VersionInfo(tag=tag, version=None, commit=commit, date=None, title="", message="")

    # one unreadable tag (too long, control characters, a commit id with a newline) is dropped, not the record
    rows = [row("v1.0.0"), row("v" * 300), row("v2.0.0\x1b[2J"), row("v3.0.0", "b" * 40 + "\n")]
    hub_cache.record_versions("org/x", rows, endpoint="http://127.0.0.1")
    read = hub_cache.read_versions("org/x", endpoint="http://127.0.0.1/")  # (a trailing slash is the same server)
    assert read is not None and [r.tag for r in read[1]] == ["v1.0.0"]
    # the same repo name on another server (a mirror, a private Hub) is another repo: its record is not this one's
    assert hub_cache.read_versions("org/x", endpoint="https://huggingface.co") is None
    assert hub_cache.read_versions("org/x", endpoint="http://127.0.0.1:8080") is None
    record = hub_cache.versions_record("org/x")
    assert record is not None and [p.name for p in record.parent.iterdir()] == [record.name]  # no temporary left
    assert not hub_cache.SHA1.match("a" * 40 + "\n") and not hub_cache.SHA256.match("a" * 64 + "\n")
    # an endpoint with credentials is recorded scrubbed, and still recognised (its password never stored)
    hub_cache.record_versions("org/y", rows, endpoint="https://user:s3cretPassw0rd@hub.example")
    other = hub_cache.versions_record("org/y")
    assert other is not None and "s3cretPassw0rd" not in other.read_text()
    assert hub_cache.read_versions("org/y", endpoint="https://user:s3cretPassw0rd@hub.example") is not None


# ----------------------------------------------------------------------------------------- foreign checkpoints


def test_push_of_a_checkpoint_we_did_not_write_needs_force(
    hub: FakeHub, llama_base: Path, llama_lora: Path, tmp_path: Path
) -> None:
    with pytest.raises(ah.InvalidAdapterError, match="neither `adapters merge` wrote") as info:
        ah.push(llama_base, "org/llama", version="1.0.0")
    assert info.value.hint is not None and "--force" in info.value.hint
    assert not hub.hits("POST", r"/commit/")
    r = run_cli("push", str(llama_base), "org/llama", "--version", "1.0.0")
    assert r.exit_code != 0 and "--force" in r.output
    forced = ah.push(llama_base, "org/llama", version="1.0.0", force=True)
    assert any("published anyway (--force)" in w for w in forced.warnings)

    ah.merge(llama_lora, base=llama_base, out=tmp_path / "merged")
    merged = ah.push(tmp_path / "merged", "org/merged", version="1.0.0")  # ours: no --force needed
    assert not any("anyway" in w for w in merged.warnings)
    ah.pull("org/merged@v1.0.0", out=tmp_path / "pulled")
    ah.push(tmp_path / "pulled", "org/merged-copy", version="1.0.0")  # pulled from a store: accepted

    root = tmp_path / "registry"
    root.mkdir()
    with pytest.raises(ah.InvalidAdapterError, match="neither `adapters merge` wrote"):
        ah.push(llama_base, f"file://{root}/acme/llama", version="1.0.0")
    assert not (root / "acme" / "llama" / "versions").exists() or not any(
        (root / "acme" / "llama" / "versions").iterdir()
    )


# ------------------------------------------------------------------------------------------ the API never prints


def test_the_api_prints_no_progress_bars_and_the_cli_none_when_piped(
    hub: FakeHub, llama_lora: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from huggingface_hub import HfApi

    tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")
    user_states = {"_global": True, "some.group": False}  # a library user's own settings: bars on
    monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # conftest's env switch, undone
    monkeypatch.setattr(tqdm_module, "progress_bar_states", dict(user_states))
    capfd.readouterr()
    HfApi().create_repo("org/raw")
    HfApi().upload_file(
        path_or_fileobj=str(llama_lora / "adapter_model.safetensors"), path_in_repo="w.safetensors", repo_id="org/raw"
    )
    assert "%" in capfd.readouterr().err  # huggingface_hub itself draws bars in this set-up

    ah.push(llama_lora, "org/lora", version="1.0.0")
    ah.pull("org/lora@v1.0.0", out=tmp_path / "pulled")
    ah.versions("org/lora")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert tqdm_module.progress_bar_states == user_states  # restored, not left changed

    r = run_cli("push", str(llama_lora), "org/lora", "--version", "1.1.0")
    assert r.exit_code == 0, r.output
    r2 = run_cli("pull", "org/lora", "-o", str(tmp_path / "p2"))
    assert r2.exit_code == 0, r2.output
    captured = capfd.readouterr()
    for text in (r.output, r2.output, captured.out, captured.err):
        assert "%|" not in text and "█" not in text and "pushing" not in text and "pulling" not in text
