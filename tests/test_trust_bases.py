"""Base checkpoints are read as their index says, and only inside their folder; a secret never leaves its file.

A table of bad bases (an index naming shards outside the folder or with entries that are not names, an index and
shards that disagree, files that are links out of the folder or FIFOs) is shown through the API (``validate`` and
``merge``: a typed error from ``adapterhub_cli.errors``) and the CLI (exit status 2, one error message, no
traceback), with no output written and the inputs unchanged; the index cases again for a base read from a store
(a local registry, the Hub). Then the secret: a base whose side files link to a file holding a token (and to
``/proc/self/environ``) is merged and pushed, and the token appears in no output folder and nowhere on the Hub or
in a registry; push refuses an adapter or a card that links out of its folder, and pull a registry copy that
is a link.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import assert_one_error, run_cli
from click.testing import Result
from hub_server import FakeHub, serving

import adapterhub_cli as ah
from adapterhub_cli.artifact.ref import Version
from adapterhub_cli.artifact.safetensors import save_safetensors
from adapterhub_cli.errors import AdaptersError, CorruptFileError, UnsafeFileError
from adapterhub_cli.stores.local import LocalStore


SECRET = "hf_FAKEtokenFAKEtokenFAKEtokenFAKEto"  # what a stranger's base tries to make us copy or upload
HUB_TOKEN = "hf_test_server_token_0123456789"
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"
EMBED = "model.embed_tokens.weight"  # in shard 1

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with serving(monkeypatch, tokens={HUB_TOKEN}, token=HUB_TOKEN) as server:
        yield server


def cli_error(result: Result) -> str:
    """Check the CLI failed cleanly (exit 2, one error message, no traceback); return its message on one line."""
    assert_one_error(result)
    return " ".join(result.stderr.split())


def fingerprint(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots`` -> its sha256, link target or kind: to show inputs are unchanged."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            if p.is_symlink():
                out[str(p)] = f"-> {p.readlink()}"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir" if p.is_dir() else "other"
    return out


def edit_index(base: Path, change: Callable[[dict], object]) -> None:
    doc = json.loads((base / INDEX).read_text())
    (base / INDEX).write_text(json.dumps(change(doc)))


def set_entry(key: str, shard: object) -> Callable[[dict], dict]:
    return lambda doc: {**doc, "weight_map": {**doc["weight_map"], key: shard}}


# ------------------------------------------------------------------------------------ the table


@dataclass
class Case:
    """A bad base made from a copy of the sharded (or single-file) llama base, and the error it must give."""

    id: str
    make: Callable[[Path, Path], None]  # (base copy, a folder outside it) -> None
    exc: type[AdaptersError]
    says: str
    single: bool = False
    store: bool = False  # the index case also holds for a base read from a store


def _outside_shard(name: str) -> Callable[[Path, Path], None]:
    """The index names ``name`` for the embedding (a readable copy of shard 1 is put where it points)."""

    def make(base: Path, elsewhere: Path) -> None:
        if "/" in name or "\\" in name:
            shutil.copyfile(base / SHARD1, elsewhere / "outside.safetensors")
        edit_index(base, set_entry(EMBED, name))

    return make


def _moved(base: Path, elsewhere: Path) -> None:
    edit_index(base, set_entry(EMBED, SHARD2))  # shard 1 holds it


def _in_two_shards(base: Path, elsewhere: Path) -> None:
    from safetensors.torch import load_file

    second = load_file(base / SHARD2)
    second[EMBED] = load_file(base / SHARD1)[EMBED]  # a different copy could hide behind the index
    save_safetensors(second, base / SHARD2)


def _unlisted(base: Path, elsewhere: Path) -> None:
    edit_index(base, lambda doc: {**doc, "weight_map": {k: v for k, v in doc["weight_map"].items() if k != EMBED}})


def _missing_shard(base: Path, elsewhere: Path) -> None:
    (base / SHARD2).unlink()


def _link_out(name: str) -> Callable[[Path, Path], None]:
    """``name`` becomes a symlink to a copy of itself outside the folder."""

    def make(base: Path, elsewhere: Path) -> None:
        shutil.move(base / name, elsewhere / name)
        (base / name).symlink_to(elsewhere / name)

    return make


def _fifo(base: Path, elsewhere: Path) -> None:
    (base / SHARD2).unlink()
    os.mkfifo(base / SHARD2)  # reading it would wait forever


NOT_PLAIN = "not a plain .safetensors file name in the checkpoint folder"
LINKED = "is not a regular file inside the folder (a symlink leading out of it)"
CASES = [
    Case("shard ../outside", _outside_shard("../elsewhere/outside.safetensors"), CorruptFileError, NOT_PLAIN),
    Case("shard in a subfolder", _outside_shard("sub/outside.safetensors"), CorruptFileError, NOT_PLAIN),
    Case("shard absolute", _outside_shard("/etc/outside.safetensors"), CorruptFileError, NOT_PLAIN, store=True),
    Case("shard with a backslash", _outside_shard("..\\outside.safetensors"), CorruptFileError, NOT_PLAIN),
    Case("shard drive-relative", _outside_shard("C:outside.safetensors"), CorruptFileError, NOT_PLAIN),
    Case("shard '..'", _outside_shard(".."), CorruptFileError, NOT_PLAIN),
    Case("shard not a weight file", _outside_shard("config.json"), CorruptFileError, NOT_PLAIN, store=True),
    Case(
        "shard a number",
        lambda b, e: edit_index(b, set_entry(EMBED, 3)),
        CorruptFileError,
        "is not a shard file name",
        store=True,
    ),
    Case(
        "shard null", lambda b, e: edit_index(b, set_entry(EMBED, None)), CorruptFileError, "is not a shard file name"
    ),
    Case(
        "weight_map a list",
        lambda b, e: edit_index(b, lambda d: {**d, "weight_map": list(d["weight_map"])}),
        CorruptFileError,
        "index has no weight_map",
        store=True,
    ),
    Case(
        "weight_map empty",
        lambda b, e: edit_index(b, lambda d: {**d, "weight_map": {}}),
        CorruptFileError,
        "index lists no tensors",
        store=True,
    ),
    Case("index a list", lambda b, e: edit_index(b, lambda d: [d]), CorruptFileError, "must hold a JSON object"),
    Case(
        "tensor in another shard than indexed",
        _moved,
        CorruptFileError,
        f"the index places tensor {EMBED!r} in {SHARD2}, but {SHARD1} holds it",
        store=True,
    ),
    Case("tensor in two shards", _in_two_shards, CorruptFileError, f"tensor {EMBED!r} is in 2 shards", store=True),
    Case(
        "tensor not in the index",
        _unlisted,
        CorruptFileError,
        f"{SHARD1} holds tensor {EMBED!r}, which the index does not list",
        store=True,
    ),
    Case(
        "index names a missing shard", _missing_shard, CorruptFileError, f"the index names {SHARD2}, which is missing"
    ),
    Case("shard linked out", _link_out(SHARD2), UnsafeFileError, f"checkpoint file {SHARD2} {LINKED}"),
    Case("index linked out", _link_out(INDEX), UnsafeFileError, f"checkpoint file {INDEX} {LINKED}"),
    Case("config linked out", _link_out("config.json"), UnsafeFileError, f"checkpoint file config.json {LINKED}"),
    Case("shard a FIFO", _fifo, UnsafeFileError, f"checkpoint file {SHARD2} is not a regular file inside the folder"),
    Case("single file linked out", _link_out("model.safetensors"), UnsafeFileError, LINKED, single=True),
]


@pytest.fixture
def bad_base(
    request: pytest.FixtureRequest, tmp_path: Path, llama_base: Path, llama_base_sharded: Path
) -> Iterator[tuple[Case, Path, dict[str, str]]]:
    case: Case = request.param
    base, elsewhere = tmp_path / "base", tmp_path / "elsewhere"
    shutil.copytree(llama_base if case.single else llama_base_sharded, base)
    elsewhere.mkdir()
    case.make(base, elsewhere)
    yield case, base, fingerprint(base, elsewhere)


@pytest.mark.parametrize("command", ["validate", "merge"])
@pytest.mark.parametrize("bad_base", CASES, ids=[c.id for c in CASES], indirect=True)
def test_a_bad_base_is_refused(
    bad_base: tuple[Case, Path, dict[str, str]], command: str, llama_lora: Path, tmp_path: Path
) -> None:
    case, base, before = bad_base
    out = tmp_path / "out"
    with pytest.raises(case.exc) as info:
        if command == "validate":
            ah.validate(llama_lora, base=base)
        else:
            ah.merge(llama_lora, base=base, out=out)
    assert case.says in " ".join(str(info.value).split())
    args = ["validate", str(llama_lora), "--base", str(base)]
    if command == "merge":
        args = ["merge", str(llama_lora), "--into", str(base), "-o", str(out)]
    assert case.says in cli_error(run_cli(*args))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base", "elsewhere"]
    assert fingerprint(base, tmp_path / "elsewhere") == before


STORE_CASES = [c for c in CASES if c.store]


@pytest.mark.parametrize("store", ["registry", "hub"])
@pytest.mark.parametrize("bad_base", STORE_CASES, ids=[c.id for c in STORE_CASES], indirect=True)
def test_a_bad_store_base_is_refused(
    bad_base: tuple[Case, Path, dict[str, str]],
    store: str,
    llama_lora: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The index of a base read from a store (generic range reads) is checked as a local one is."""
    case, base, _ = bad_base
    files = {p.name: p for p in base.iterdir()}
    if store == "registry":
        root = tmp_path / "registry"
        root.mkdir()
        ref = f"file://{root}/org/base"
        LocalStore().publish(ref, files, version=Version(1, 0, 0), card=None)  # no validation: a stranger's push
        ref += "@1.0.0"
    else:
        with serving(monkeypatch, tokens={HUB_TOKEN}, token=HUB_TOKEN):
            _check_store_base(case, "org/base", files, llama_lora, tmp_path)
        return
    _check_store_base(case, ref, {}, llama_lora, tmp_path)


def _check_store_base(case: Case, ref: str, raw: dict[str, Path], llama_lora: Path, tmp_path: Path) -> None:
    if raw:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi()
        api.create_repo(ref)
        api.create_commit(ref, operations=[CommitOperationAdd(n, str(p)) for n, p in raw.items()], commit_message="x")
    with pytest.raises(case.exc) as info:
        ah.validate(llama_lora, base=ref)
    assert case.says in " ".join(str(info.value).split())
    out = tmp_path / "out"
    assert case.says in cli_error(run_cli("merge", str(llama_lora), "--into", ref, "-o", str(out)))
    assert not out.exists()


def test_links_inside_the_folder_and_cache_snapshots_are_read(llama_base_sharded: Path, tmp_path: Path) -> None:
    """The rule refuses only what leads out: a shard linked to another name in the folder is read."""
    base = tmp_path / "base"
    shutil.copytree(llama_base_sharded, base)
    (base / SHARD2).rename(base / "real-shard-2.bin")
    (base / SHARD2).symlink_to("real-shard-2.bin")
    view = ah.open_base(base)
    assert view.shard_of[EMBED] == base / SHARD1 and len(view.tensors) == 21


# ------------------------------------------------------------------------------------- secrets


@pytest.fixture
def base_with_secret_links(tmp_path: Path, llama_base: Path) -> Path:
    """A base whose side files are links to a file holding a token and to this process's environment, plus a
    FIFO named like a tokenizer file (reading it would hang)."""
    secret = tmp_path / "secret.txt"
    secret.write_text(f"HF_TOKEN={SECRET}\n")
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    (base / "tokenizer_config.json").symlink_to(secret)
    (base / "special_tokens_map.json").symlink_to("/proc/self/environ")
    os.mkfifo(base / "vocab.txt")
    return base


def _holds_secret(folder: Path) -> list[str]:
    return [
        str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()
    ]


def test_a_secret_linked_from_a_base_is_never_merged_or_pushed(
    hub: FakeHub, base_with_secret_links: Path, llama_lora: Path, tmp_path: Path
) -> None:
    base = base_with_secret_links
    before = fingerprint(base)
    ah.merge(llama_lora, base=base, out=tmp_path / "api")
    result = run_cli("merge", str(llama_lora), "--into", str(base), "-o", str(tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    for out in (tmp_path / "api", tmp_path / "cli"):
        names = {p.name for p in out.iterdir()}
        assert "config.json" in names and not {"tokenizer_config.json", "special_tokens_map.json", "vocab.txt"} & names
        assert not _holds_secret(out) and all(p.is_file() and not p.is_symlink() for p in out.iterdir())

    pushed = run_cli("push", str(tmp_path / "cli"), "org/merged", "--version", "1.0.0")
    assert pushed.exit_code == 0, pushed.output
    base_push = ah.push(base, "org/base", version="1.0.0", force=True)  # the base itself: links, FIFO left out
    assert {"tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}.isdisjoint(base_push.files)
    registry = tmp_path / "registry"
    registry.mkdir()
    ah.push(base, f"file://{registry}/org/base", version="1.0.0", force=True)
    assert SECRET.encode() not in hub.stored_bytes() and not _holds_secret(registry)
    assert fingerprint(base) == before

    pulled = ah.pull("org/base@v1.0.0", out=tmp_path / "pulled")
    assert not _holds_secret(pulled.path) and not _holds_secret(Path(os.environ["HF_HUB_CACHE"]))


def _adapter_link_out(name: str) -> Callable[[Path, Path], Path]:
    def make(adapter: Path, elsewhere: Path) -> Path:
        shutil.move(adapter / name, elsewhere / name)
        (adapter / name).symlink_to(elsewhere / name)
        return adapter

    return make


def _card_link_out(adapter: Path, elsewhere: Path) -> Path:
    (elsewhere / "secret.txt").write_text(SECRET)
    (adapter / "README.md").unlink(missing_ok=True)
    (adapter / "README.md").symlink_to(elsewhere / "secret.txt")
    return adapter


PUSH_CASES = {
    "adapter config linked out": (_adapter_link_out("adapter_config.json"), "adapter file adapter_config.json"),
    "adapter weights linked out": (
        _adapter_link_out("adapter_model.safetensors"),
        "adapter file adapter_model.safetensors",
    ),
    "card linked out": (_card_link_out, "card README.md"),
}


@pytest.mark.parametrize("target", ["hub", "registry"])
@pytest.mark.parametrize("name", list(PUSH_CASES))
def test_push_refuses_files_that_link_out_of_the_folder(
    name: str, target: str, hub: FakeHub, llama_lora: Path, tmp_path: Path
) -> None:
    make, says = PUSH_CASES[name]
    adapter, elsewhere = tmp_path / "adapter", tmp_path / "elsewhere"
    shutil.copytree(llama_lora, adapter)
    elsewhere.mkdir()
    make(adapter, elsewhere)
    before = fingerprint(adapter, elsewhere)
    (tmp_path / "registry").mkdir()
    repo = "org/lora" if target == "hub" else f"file://{tmp_path / 'registry'}/org/lora"
    with pytest.raises(UnsafeFileError) as info:
        ah.push(adapter, repo, version="1.0.0")
    assert f"{says} {LINKED}" in str(info.value)
    assert f"{says} {LINKED}" in cli_error(run_cli("push", str(adapter), repo, "--version", "1.0.0"))
    assert not hub.hits("POST", r"/commit/") and not list((tmp_path / "registry").iterdir())
    assert fingerprint(adapter, elsewhere) == before


def test_pull_refuses_a_registry_copy_that_is_a_link(llama_lora: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    ref = f"file://{root}/org/lora"
    ah.push(llama_lora, ref, version="1.0.0")
    stored = root / "org" / "lora" / "versions" / "1.0.0" / "adapter_model.safetensors"
    stored.chmod(0o644)
    stored.unlink()
    stored.symlink_to(llama_lora / "adapter_model.safetensors")  # the same bytes, but a link out of the registry
    with pytest.raises(CorruptFileError, match="not a regular file in the registry"):
        ah.pull(ref + "@1.0.0", out=tmp_path / "api")
    message = cli_error(run_cli("pull", ref + "@1.0.0", "-o", str(tmp_path / "cli")))
    assert "not a regular file in the registry" in message
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
