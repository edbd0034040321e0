"""Hub answers are untrusted: a hostile server (tests/hub_server.py with its hostile switches) never gets a token
printed, a path built from its identifiers, more bytes kept than its listing promised, a crafted safetensors header
past the checks local files get, or an escape sequence onto the terminal.

Every bad answer is shown through the API (a typed error from ``adapterhub_cli.errors``) and the CLI (exit status
2, one error message, no traceback); nothing is written outside the HF cache, no output folder appears, and the
cache keeps no file from a refused download.
"""

from __future__ import annotations

import json
import os
import struct
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_error, run_cli
from click.testing import Result
from hub_server import FakeHub, serving

import adapterhub_cli as ah
from adapterhub_cli.errors import (
    AdaptersError,
    CorruptFileError,
    HubError,
    HubResponseError,
    scrub,
    server_line,
    server_text,
)


TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # shaped like a real token: hf_ and 34 letters or digits
OTHER = "other-token-given-with-token-0123456789"  # --token / token=: hidden by its value alone
SAVED = "saved-login-token-abcdefghijklmnopqrstu"  # the saved login (hf auth login): hidden by its value alone
WEIGHTS = "adapter_model.safetensors"
ESCAPES = ("\x1b", "\x07", "\x9b", "\u202e", "\r")

# huggingface_hub's LFS upload passes data= to httpx2, which deprecates it; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh server accepting the three tokens, ``TOKEN`` in ``HF_TOKEN``."""
    with serving(monkeypatch, tokens={TOKEN, OTHER, SAVED}, token=TOKEN) as server:
        yield server


def cli_error(result: Result) -> str:
    """Check the CLI failed cleanly (exit 2, one error message, no traceback); return all it printed."""
    assert_one_error(result)
    return result.output


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Callable[[], set[Path]]]:
    """What appeared since the test began under the test's temporary folders, outside the HF cache (and the sha256
    digest cache)."""
    roots = [tmp_path, cache_root().parent]
    caches = [cache_root(), Path(os.environ["ADAPTERS_CACHE"])]
    before = set().union(*(files_under(r) for r in roots))

    def new() -> set[Path]:
        after = set().union(*(files_under(r) for r in roots))
        return {p for p in after - before if not any(p.is_relative_to(c) for c in caches)}

    yield new


# ------------------------------------------------------------------------------------ the table


@dataclass
class Case:
    """A hostile behaviour switched on after ``org/lora@v1.0.0`` (llama_lora) is published, the call it breaks
    (CLI arguments; the API call is the same command's function), and what the error must be and say."""

    id: str
    hostile: Callable[[FakeHub], None]
    args: list[str]
    exc: type[AdaptersError]
    says: list[str]
    never: list[str] = field(default_factory=list)  # what neither message nor output may hold


def _rewrite_info(fn: Callable[[dict[str, Any]], Any]) -> Callable[[FakeHub], None]:
    return lambda hub: hub.rewrite(r"^/api/models/org/lora/revision/", fn)


def _sibling(name: str, **changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        siblings = [({**s, **changes} if s["rfilename"] == name else s) for s in doc["siblings"]]
        return {**doc, "siblings": siblings}

    return change


def _extra_sibling(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda doc: {**doc, "siblings": [*doc["siblings"], {"rfilename": name, "size": 4, "blobId": "a" * 40}]}


def _tag_target(target: str) -> Callable[[FakeHub], None]:
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "tags": [{**t, "targetCommit": target} for t in doc["tags"]]}

    return lambda hub: hub.rewrite(r"^/api/models/org/lora/refs$", change)


def _oversize(extra: int | None, declare: bool) -> Callable[[FakeHub], None]:
    def switch(hub: FakeHub) -> None:
        hub.oversize, hub.declare_size = extra, declare

    return switch


def _echo(pattern: str) -> Callable[[FakeHub], None]:
    return lambda hub: hub.fail("GET", pattern, kind="echo", times=10)


PULL = ["pull", "org/lora@v1.0.0", "-o", "{out}"]
CASES = [
    Case(
        "commit id not hex",
        _rewrite_info(lambda doc: {**doc, "sha": "../../../../escape"}),
        PULL,
        HubResponseError,
        ["'../../../../escape'", "not a commit id", "org/lora"],
    ),
    Case(
        "another commit than asked",
        _rewrite_info(lambda doc: {**doc, "sha": "f" * 40}),
        PULL,
        HubResponseError,
        [f"described commit {'f' * 40} when asked for"],
    ),
    Case("tag target not hex", _tag_target("../x"), PULL, HubResponseError, ["'../x'", "not a commit id"]),
    Case(
        "tag target not hex (versions)",
        _tag_target("zz" * 20),
        ["versions", "org/lora"],
        HubResponseError,
        ["not a commit id"],
    ),
    Case(
        "file named ../../x",
        _rewrite_info(_extra_sibling("../../x")),
        PULL,
        HubResponseError,
        ["a file name that is not a relative path of plain names: '../../x'"],
    ),
    Case(
        "absolute file name",
        _rewrite_info(_extra_sibling("/tmp/evil")),
        PULL,
        HubResponseError,
        ["not a relative path", "'/tmp/evil'"],
    ),
    Case(
        "file name with .. inside",
        _rewrite_info(_extra_sibling("sub/../../../x")),
        PULL,
        HubResponseError,
        ["not a relative path"],
    ),
    Case(
        "file name with a backslash",
        _rewrite_info(_extra_sibling("..\\..\\x")),
        PULL,
        HubResponseError,
        ["not a relative path"],
    ),
    Case(
        "file name with an escape sequence",
        _rewrite_info(_extra_sibling("x\x1b[2J.json")),
        PULL,
        HubResponseError,
        ["not a relative path"],
    ),
    Case(
        "blob id not hex",
        _rewrite_info(_sibling(WEIGHTS, blobId="../../../blobs/x")),
        PULL,
        HubResponseError,
        [f"git blob id that is not 40 hex digits for {WEIGHTS}: '../../../blobs/x'"],
    ),
    Case(
        "lfs sha256 not hex",
        _rewrite_info(_sibling(WEIGHTS, lfs={"sha256": "../x", "size": 1, "pointerSize": 1})),
        PULL,
        HubResponseError,
        ["LFS sha256 that is not 64 hex digits"],
    ),
    Case(
        "size not a count",
        _rewrite_info(_sibling(WEIGHTS, size=-5)),
        PULL,
        HubResponseError,
        ["size that is not a count of bytes"],
    ),
    Case(
        "a file listed twice",
        _rewrite_info(lambda doc: {**doc, "siblings": doc["siblings"] * 2}),
        PULL,
        HubResponseError,
        [".gitattributes listed twice"],
    ),
    Case(
        "listing not an object",
        _rewrite_info(lambda doc: ["not", "an", "object"]),
        PULL,
        HubResponseError,
        ["the Hub's answer while reading org/lora@v1.0.0 could not be read"],
    ),
    Case(
        "files not a list",
        _rewrite_info(lambda doc: {**doc, "siblings": 5}),
        PULL,
        HubResponseError,
        ["org/lora"],
    ),
    Case(
        "file without a name",
        _rewrite_info(lambda doc: {**doc, "siblings": [{"size": 3}]}),
        PULL,
        HubResponseError,
        ["could not be read (KeyError: 'rfilename')"],
    ),
    Case(
        "refs without tags",
        lambda hub: hub.rewrite(r"^/api/models/org/lora/refs$", lambda doc: {"branches": 7}),
        ["versions", "org/lora"],
        HubResponseError,
        ["could not be read"],
    ),
    Case(
        "tag name not a string",
        lambda hub: hub.rewrite(
            r"^/api/models/org/lora/refs$", lambda doc: {**doc, "tags": [{**doc["tags"][0], "name": 12}]}
        ),
        PULL,
        HubResponseError,
        ["a tag of org/lora named 12"],
    ),
    Case(
        "commit date not a date",
        lambda hub: hub.rewrite(r"^/api/models/org/lora/commits/", lambda doc: [{**c, "date": "soon"} for c in doc]),
        ["versions", "org/lora"],
        HubResponseError,
        ["while listing the commits of org/lora", "could not be read"],
    ),
    Case(
        "download larger than listed",
        _oversize(1 << 20, declare=True),
        PULL,
        HubResponseError,
        ["sent more of", "than the", "bytes the Hub's listing gives it", "cut off"],
    ),
    Case(
        "endless download, no length",
        _oversize(None, declare=False),
        PULL,
        HubResponseError,
        ["cut off"],
    ),
    Case(
        "ranged answer longer than asked",
        lambda hub: setattr(hub, "range_padding", 16),
        ["inspect", "org/lora@v1.0.0"],
        HubResponseError,
        [f"the server sent more of {WEIGHTS} of org/lora@", "bytes asked for"],
    ),
    Case(
        "error echoing HF_TOKEN",
        _echo(r"/refs$"),
        ["versions", "org/lora"],
        HubError,
        ["the Hub answered 400 while listing the refs of org/lora", "token *** is not valid", "Bearer ***"],
        never=[TOKEN, *ESCAPES, "pwned"],
    ),
    Case(
        "error echoing --token",
        _echo(r"/refs$"),
        ["versions", "org/lora", "--token", OTHER],
        HubError,
        ["token *** is not valid"],
        never=[OTHER, TOKEN],
    ),
    Case(
        "error echoing the token while downloading",
        _echo(r"/resolve/.*adapter_config\.json$"),
        PULL,
        HubError,
        ["the Hub answered 400 while downloading", "Bearer ***"],
        never=[TOKEN, *ESCAPES],
    ),
]


def _api_call(args: list[str]) -> Callable[[], Any]:
    """The API function of the command line ``args`` (pull / versions / inspect), with the same options."""
    token = args[args.index("--token") + 1] if "--token" in args else None
    if args[0] == "pull":
        return lambda: ah.pull(args[1], out=args[3], token=token)
    if args[0] == "versions":
        return lambda: ah.versions(args[1], token=token)
    if args[0] == "inspect":
        return lambda: ah.inspect(args[1])
    raise AssertionError(args)


@pytest.mark.parametrize("surface", ["api", "cli"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_hub_answer_is_refused(
    case: Case,
    surface: str,
    hub: FakeHub,
    llama_lora: Path,
    tmp_path: Path,
    outside: Callable[[], set[Path]],
) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    case.hostile(hub)
    out = tmp_path / "out"
    args = [a.replace("{out}", str(out)) for a in case.args]
    if surface == "api":
        with pytest.raises(case.exc) as info:
            _api_call(args)()
        text = str(info.value)
        assert info.value.__cause__ is None  # the client's exception, which may quote headers, is not chained
        shown = "".join(traceback.format_exception(info.value))
    else:
        result = run_cli(*args)
        text = shown = cli_error(result)
    for part in case.says:
        assert part in text, text
    for part in [*case.never, TOKEN]:
        assert part not in shown, shown
    assert not out.exists() and not outside()  # no output, nothing written outside the HF cache
    repo = cache_root() / "models--org--lora"
    assert {p.name for p in repo.iterdir()} <= {"blobs", "snapshots", "refs"} if repo.is_dir() else True
    blobs = repo / "blobs"
    kept = {p.name for p in blobs.iterdir()} if blobs.is_dir() else set()
    assert not [n for n in kept if n.endswith(".incomplete")]
    assert hub.lfs.keys().isdisjoint(kept)  # the weights of a refused pull are not in the cache


def test_an_endless_download_is_cut_off_at_the_listed_size(hub: FakeHub, llama_lora: Path) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    size = hub.file_size("org/lora", "adapter_config.json")  # the first file a pull downloads
    hub.oversize, hub.declare_size = None, False  # a body without end (up to 1 GiB), delimited by nothing
    with pytest.raises(HubResponseError, match="cut off"):
        ah.pull("org/lora@v1.0.0")
    served = hub.served_bytes("org/lora", "adapter_config.json")
    assert size < served < size + (8 << 20)  # the client hung up right after the listed size (and socket buffers)


# ------------------------------------------------------------------------------------- tokens


def test_the_saved_login_is_scrubbed_by_its_value(
    hub: FakeHub, llama_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    ah.push(llama_lora, "org/lora", version="1.0.0")
    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).write_text(SAVED)
    hub.fail("GET", r"/refs$", kind="echo", times=2)
    with pytest.raises(HubError) as info:
        ah.versions("org/lora")
    assert SAVED not in "".join(traceback.format_exception(info.value)) and "token *** is not valid" in str(info.value)
    assert SAVED in hub.requests[-1]["auth"]  # the saved login was what the server got (and echoed)
    output = cli_error(run_cli("versions", "org/lora"))
    assert SAVED not in output and "token *** is not valid" in output


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        (f"Authorization: Bearer {OTHER}", "Authorization: Bearer ***"),
        (f"authorization: bearer {OTHER}, next", "authorization: bearer ***, next"),
        (f"token={TOKEN}&x=1", "token=***&x=1"),  # the env token by value, and by shape
        ("hf_" + "Z" * 34, "***"),  # any Hub-shaped token
        ("/tmp/hf_home0/hub/models--org--lora", "/tmp/hf_home0/hub/models--org--lora"),  # paths stay readable
        # an endpoint with credentials in its user info (HF_ENDPOINT=https://user:pass@host)
        (
            "not found on https://bob:s3cr3t-pass@hub.example.org/api",
            "not found on https://bob:***@hub.example.org/api",
        ),
        ("http://127.0.0.1:8080/api and user@host", "http://127.0.0.1:8080/api and user@host"),  # ports and mails stay
    ],
)
def test_scrub_removes_tokens_by_value_and_shape(text: str, clean: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert scrub(text) == clean
    assert AdaptersError(text, hint=text).args[0] == clean and AdaptersError(text, hint=text).hint == clean


def test_server_text_strips_escape_sequences_and_controls() -> None:
    hostile = "v1\x1b[31mred\x1b[0m\x1b]0;title\x07 \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ \x9b2J\u202eevil\r\x00!"
    assert server_text(hostile) == "v1red link evil!"
    assert server_text("line one\nline two\tend") == "line one\nline two\tend"  # a commit message keeps its lines
    assert server_line("a\n\n  b " + "c" * 400, limit=20) == "a b " + "c" * 15 + "…"


# ------------------------------------------------------------------- identifiers and the cache


def test_file_headers_never_name_a_cache_path(
    hub: FakeHub, llama_lora: Path, tmp_path: Path, outside: Callable[[], set[Path]]
) -> None:
    """ETag and X-Repo-Commit (which huggingface_hub builds cache paths from) are not used: hostile ones change
    nothing, and the files land under the names the checked listing gives."""
    pushed = ah.push(llama_lora, "org/lora", version="1.0.0")
    hub.file_headers = {"ETag": '"../../../../../evil"', "X-Repo-Commit": "../../../evil"}
    result = run_cli("pull", "org/lora@v1.0.0", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == (llama_lora / WEIGHTS).read_bytes()
    assert outside() == {tmp_path / "out", *(tmp_path / "out").iterdir()}
    cached = ah.pull("org/lora@v1.0.0").path
    assert cached == cache_root() / "models--org--lora" / "snapshots" / pushed.commit
    assert (cached / WEIGHTS).resolve().parent == cache_root() / "models--org--lora" / "blobs"


def test_a_planted_cache_link_is_replaced_never_written_through(
    hub: FakeHub, llama_lora: Path, tmp_path: Path
) -> None:
    pushed = ah.push(llama_lora, "org/lora", version="1.0.0")
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious, not the adapter")
    snapshot = cache_root() / "models--org--lora" / "snapshots" / pushed.commit
    snapshot.mkdir(parents=True)
    (snapshot / WEIGHTS).symlink_to(victim)  # a link out of the cache where the weights belong
    pulled = ah.pull("org/lora@v1.0.0", out=tmp_path / "out")
    assert victim.read_bytes() == b"precious, not the adapter"
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == (llama_lora / WEIGHTS).read_bytes()
    assert (snapshot / WEIGHTS).resolve().parent == cache_root() / "models--org--lora" / "blobs"
    assert pulled.commit == pushed.commit


@pytest.mark.parametrize("surface", ["api", "cli"])
def test_a_cache_folder_linked_out_of_the_cache_is_refused(
    surface: str, hub: FakeHub, llama_lora: Path, tmp_path: Path
) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    repo = cache_root() / "models--org--lora"
    repo.mkdir(parents=True)
    (repo / "blobs").symlink_to(elsewhere)
    if surface == "api":
        with pytest.raises(HubResponseError, match="leads out of"):
            ah.pull("org/lora@v1.0.0", out=tmp_path / "out")
    else:
        assert "leads out of" in cli_error(run_cli("pull", "org/lora@v1.0.0", "-o", str(tmp_path / "out")))
    assert not list(elsewhere.iterdir()) and not (tmp_path / "out").exists()


# ----------------------------------------------------------------- crafted headers by range reads


def _crafted(header: dict[str, Any], data_size: int, *, length: int | None = None) -> Callable[[bytes], bytes]:
    raw = json.dumps(header).encode()
    return lambda _: struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(data_size)


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _pair(a: list[int], b: list[int], a_dtype: str = "F32") -> dict[str, Any]:
    return {
        f"{Q}.lora_A.weight": {"dtype": a_dtype, "shape": [8, 64], "data_offsets": a},
        f"{Q}.lora_B.weight": {"dtype": "F32", "shape": [64, 8], "data_offsets": b},
    }


CRAFTED = {
    "header length past the end": (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header length 1099511627776"),
    "offsets past the end": (_crafted(_pair([0, 2048], [2048, 4096]), 3000), "lie past the end of the data"),
    "overlapping tensors": (_crafted(_pair([0, 2048], [1024, 3072]), 3072), "overlap in the file"),
    "unknown dtype": (_crafted(_pair([0, 2048], [2048, 4096], a_dtype="X99"), 4096), "unknown dtype 'X99'"),
    "size disagrees with dtype x shape": (_crafted(_pair([0, 100], [100, 2148]), 2148), "lora_A.weight"),
    "header not JSON": (lambda b: struct.pack("<Q", 5) + b"{oops" + bytes(8), "header is not valid JSON"),
}


def _publish_raw(repo_id: str, files: dict[str, bytes]) -> None:
    """Commit files as they are (no validation): what a stranger's repo may hold."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(
        repo_id, operations=[CommitOperationAdd(n, data) for n, data in files.items()], commit_message="raw"
    )


@pytest.mark.parametrize("as_base", [False, True], ids=["adapter", "base"])
@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_header_read_by_range_is_checked_like_a_local_file(
    name: str, as_base: bool, hub: FakeHub, llama_lora: Path, tmp_path: Path
) -> None:
    craft, says = CRAFTED[name]
    crafted = craft((llama_lora / WEIGHTS).read_bytes())
    if as_base:
        _publish_raw("org/base", {"config.json": b'{"model_type": "llama"}', "model.safetensors": crafted})
        api_call: Callable[[], Any] = lambda: ah.merge(llama_lora, base="org/base", out=tmp_path / "out")  # noqa: E731
        args = ["merge", str(llama_lora), "--into", "org/base", "-o", str(tmp_path / "out")]
    else:
        _publish_raw(
            "org/crafted", {"adapter_config.json": (llama_lora / "adapter_config.json").read_bytes(), WEIGHTS: crafted}
        )
        api_call = lambda: ah.inspect("org/crafted")  # noqa: E731
        args = ["inspect", "org/crafted"]
    with pytest.raises(CorruptFileError) as info:
        api_call()
    assert says in str(info.value) and "org/" in str(info.value)
    output = cli_error(run_cli(*args))
    assert says in " ".join(output.split())
    assert not (tmp_path / "out").exists()
    assert (
        hub.served_bytes("org/base" if as_base else "org/crafted", "model.safetensors" if as_base else WEIGHTS)
        <= 200_000
    )


# --------------------------------------------------------------------------- text shown to people


def test_escape_sequences_in_commit_titles_messages_and_tags_are_stripped(hub: FakeHub, llama_lora: Path) -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07release\x1b[31m notes\r\u202e"
    ah.push(llama_lora, "org/lora", version="1.0.0", message=hostile)

    def change(doc: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**c, "title": hostile + c["title"]} for c in doc]

    hub.rewrite(r"^/api/models/org/lora/commits/", change)
    hub.rewrite(
        r"^/api/models/org/lora/refs$",
        lambda doc: {**doc, "tags": [*doc["tags"], {**doc["tags"][0], "name": "v2.0.0\x1b[8m"}]},
    )
    rows = ah.versions("org/lora")
    assert [r.tag for r in rows] == ["v1.0.0", "v2.0.0"]  # not a semver tag as the server spells it: listed last
    assert rows[0].message == "release notes" and rows[0].title.startswith("release notes")
    for r in rows:
        assert not any(c in r.tag + r.title + r.message for c in ESCAPES)
    for args in (["versions", "org/lora"], ["versions", "org/lora", "--json"]):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert "release" in result.output and not any(c in result.output for c in ESCAPES)
        assert "pwned" not in result.output


def test_hub_error_text_is_one_clean_line(hub: FakeHub, llama_lora: Path) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    hub.fail("GET", r"/refs$", kind="echo", times=2)
    with pytest.raises(HubError) as info:
        ah.versions("org/lora")
    message = str(info.value)
    assert "\n" not in message and not any(c in message for c in ESCAPES) and "pwned" not in message
    stderr = cli_error(run_cli("versions", "org/lora"))
    assert not any(c in stderr for c in ESCAPES)
    assert os.environ["HF_TOKEN"] == TOKEN and TOKEN not in stderr
