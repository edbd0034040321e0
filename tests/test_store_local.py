"""The local directory registry (``file:///ROOT/ORG/NAME``): the Hub's versioning semantics on a file system.

Real tiny models and PEFT adapters from conftest go through the API and the CLI: push, versions, pull with ranges,
immutable versions, --force for older ones, sha256 checks, concurrent pushes of one version, a push that dies
half-way, and every command that takes an adapter or a base reading such refs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_helpers import run_cli

import adapterhub_cli as ah
from adapterhub_cli.artifact.ref import AdapterRef
from adapterhub_cli.errors import CorruptFileError, StoreNotFoundError, UsageError, VersionConflictError
from adapterhub_cli.stores import find_store, get_store, stores
from adapterhub_cli.stores import local as local_store
from adapterhub_cli.stores.local import MANIFEST, ROOTS_ENV, LocalStore


@pytest.fixture
def root(tmp_path: Path) -> Path:
    out = tmp_path / "registry"
    out.mkdir()
    return out


def uri(root: Path, repo: str = "acme/lora", rev: str | None = None) -> str:
    return f"file://{root}/{repo}" + (f"@{rev}" if rev else "")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_model(a: Path, b: Path) -> None:
    """Two merge outputs hold the same files and the same tensors (their provenance, which names where the base was
    read from, and their cards may differ)."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta), name
        elif name not in ("README.md", ".adapters-output"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --------------------------------------------------------------------------------------------- refs, registry


def test_refs_and_the_registry(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = AdapterRef.parse(uri(root, rev="^1.2"))
    assert (ref.store, ref.root, ref.repo_id, ref.revision, ref.kind) == (
        "file",
        str(root),
        "acme/lora",
        "^1.2",
        "range",
    )
    assert str(ref) == uri(root, rev="^1.2") and ref.repo_ref == uri(root) and not ref.is_hub
    plugin = AdapterRef.parse("s3://bucket/acme/lora@^1.2")  # a plugin store's scheme: its body is its own
    assert (plugin.store_name, plugin.repo_id, plugin.revision, str(plugin)) == (
        "s3",
        "bucket/acme/lora",
        "^1.2",
        "s3://bucket/acme/lora@^1.2",
    )
    assert AdapterRef.parse("org/name@1.0.0").store_name == "hf" and AdapterRef.parse("./x").store_name is None
    assert isinstance(find_store(uri(root)), LocalStore) and find_store("./lora") is None
    assert type(find_store("org/name@v1.0.0")) is type(stores()["hf"])
    for bad in ("file://relative/acme/lora", f"file://{root}/acme/..", f"file://{root}/../x/acme/lora", "file:///a/b"):
        with pytest.raises(UsageError):
            LocalStore().parse(bad)
    with pytest.raises(UsageError, match=r"hf://.*file://"):  # an unknown scheme lists the known stores
        get_store("s3://bucket/acme/lora")
    r = run_cli("inspect", "s3://bucket/acme/lora")
    assert r.exit_code != 0 and "file://" in r.output and "Traceback" not in r.output

    bare = f"{root}/acme/lora@1.0.0"  # a bare absolute path is a registry ref only below a registered root
    assert find_store(bare) is None
    monkeypatch.setenv(ROOTS_ENV, f"/nonexistent{os.pathsep}{root}")
    assert isinstance(find_store(bare), LocalStore) and LocalStore().parse(bare).repo_ref == uri(root)
    assert find_store(f"{root}/acme/lora/versions/1.0.0") is None  # a version folder itself stays a folder


# ---------------------------------------------------------------------------------- push, versions, pull


def test_push_versions_pull_ranges(root: Path, llama_lora: Path, llama_rslora: Path, tmp_path: Path) -> None:
    for version, src in (("1.0.0", llama_lora), ("1.2.0", llama_rslora), ("1.3.0-rc.1", llama_lora)):
        res = ah.push(src, uri(root), version=version, message=f"release {version}")
        assert res.ref == uri(root, rev=f"v{version}") and len(res.commit) == 64
    r = run_cli("push", str(llama_lora), uri(root), "--version", "2.0.0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tag"] == "v2.0.0"

    r = run_cli("versions", uri(root), "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [v["tag"] for v in rows] == ["v2.0.0", "v1.3.0-rc.1", "v1.2.0", "v1.0.0"]
    assert rows[2]["message"] == "release 1.2.0" and rows[2]["date"]

    store = LocalStore()
    picks = {"^1": "v1.2.0", "~1.2": "v1.2.0", "1": "v1.2.0", "latest": "v2.0.0", "1.3.0-rc.1": "v1.3.0-rc.1"}
    for rev, tag in {**picks, "1.0.0": "v1.0.0", "v1.2.0": "v1.2.0"}.items():
        assert store.resolve(uri(root, rev=rev)).tag == tag, rev
    assert store.resolve(uri(root)).tag == "v2.0.0"  # no revision: the highest release
    pinned = store.resolve(uri(root, rev="1.2.0"))
    assert store.resolve(uri(root, rev=pinned.commit)).tag == "v1.2.0"  # the content id pins it too
    assert store.resolve(uri(root, rev=pinned.commit[:16])).commit == pinned.commit
    with pytest.raises(StoreNotFoundError, match="published"):
        store.resolve(uri(root, rev="^3"))
    with pytest.raises(StoreNotFoundError, match="no repo") as missing:
        store.resolve(uri(root, repo="acme/none"))
    assert not isinstance(missing.value, ah.HubError)  # a local registry's errors do not claim to be the Hub's

    out = tmp_path / "pulled"
    r = run_cli("pull", uri(root, rev="^1.2"), "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["tag"] == "v1.2.0" and doc["commit"] == pinned.commit
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (llama_rslora / name).read_bytes()
    record = json.loads((out / ".adapters-pull.json").read_text())
    assert record["uri"] == uri(root, rev=pinned.commit) and record["store"] == "file"
    card = (out / "README.md").read_text()
    assert f'ah.load("{uri(root)}@v1.2.0")' in card and "| `model.layers.0.self_attn.q_proj` |" in card
    assert ah.load(out).provenance.source == uri(root, rev=pinned.commit)  # the pinned version, not the folder


def test_published_versions_are_immutable(root: Path, llama_lora: Path, llama_rslora: Path) -> None:
    ah.push(llama_lora, uri(root), version="1.2.0")
    before = tree(root)
    r = run_cli("push", str(llama_rslora), uri(root), "--version", "1.2.0")
    assert r.exit_code != 0 and "already exists" in r.output and "Traceback" not in r.output
    with pytest.raises(VersionConflictError, match="never moved"):
        ah.push(llama_rslora, uri(root), version="v1.2.0", force=True)  # not even with --force
    with pytest.raises(VersionConflictError, match="lower than the latest"):
        ah.push(llama_rslora, uri(root), version="1.1.0")
    assert tree(root) == before
    r = run_cli("push", str(llama_rslora), uri(root), "--version", "1.1.0", "--force")
    assert r.exit_code == 0, r.output
    assert [v.tag for v in ah.versions(uri(root))] == ["v1.2.0", "v1.1.0"]
    assert all(tree(root)[k] == v for k, v in before.items())  # 1.2.0 untouched
    version_dir = root / "acme" / "lora" / "versions" / "1.2.0"
    assert all(p.stat().st_mode & 0o222 == 0 for p in version_dir.iterdir())  # published files are read-only


def test_a_tampered_file_fails_its_sha256(root: Path, llama_lora: Path, tmp_path: Path) -> None:
    ah.push(llama_lora, uri(root), version="1.0.0")
    weights = root / "acme" / "lora" / "versions" / "1.0.0" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: the header still parses
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    r = run_cli("pull", uri(root, rev="1.0.0"), "-o", str(tmp_path / "out"))
    assert r.exit_code != 0 and "sha256" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
    lora = ah.load(uri(root, rev="1.0.0"))  # headers are read; the weights are checked when first needed
    with pytest.raises(CorruptFileError, match="sha256"):
        lora.factors(next(iter(lora.modules)))


# ------------------------------------------------------------------------------------ concurrency, crashes


def test_concurrent_pushes_of_one_version_one_wins(
    root: Path, llama_lora: Path, llama_rslora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both pushes pass the version check, then race to rename their complete folder onto the version: the
    rename is atomic, so one wins and the other gets a clear error, and the winner's files are whole."""
    barrier = threading.Barrier(2, timeout=30)
    rename = local_store._rename_new

    def racing(*args: object) -> None:
        barrier.wait()  # both reach the rename with a complete temporary folder
        rename(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(local_store, "_rename_new", racing)
    outcomes: dict[str, object] = {}

    def push(name: str, src: Path) -> None:
        try:
            outcomes[name] = ah.push(src, uri(root), version="1.0.0")
        except Exception as e:
            outcomes[name] = e

    threads = [threading.Thread(target=push, args=(n, s)) for n, s in (("a", llama_lora), ("b", llama_rslora))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes.values() if isinstance(o, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], VersionConflictError), outcomes
    assert "another push" in str(errors[0])
    winner = next(n for n, o in outcomes.items() if not isinstance(o, Exception))
    src = llama_lora if winner == "a" else llama_rslora
    pulled = ah.pull(uri(root, rev="1.0.0"))
    assert (pulled.path / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in (root / "acme" / "lora" / "versions").iterdir()] == ["1.0.0"]  # no leftovers


def test_concurrent_cli_pushes_in_two_processes(root: Path, llama_lora: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "adapters"), "push", str(llama_lora), uri(root), "--version", "3.0.0"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read() if p.stdout else "") for p in procs]
    assert sorted(rc == 0 for rc, _ in results) == [False, True], results  # exactly one wins
    loser = [out for rc, out in results if rc != 0]
    assert len(loser) == 1 and ("already exists" in loser[0] or "another push" in loser[0]), results
    assert [v.tag for v in ah.versions(uri(root))] == ["v3.0.0"]


def test_a_push_that_dies_midway_leaves_earlier_versions_intact(
    root: Path, llama_lora: Path, llama_rslora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ah.push(llama_lora, uri(root), version="1.0.0")
    before = tree(root)

    def boom(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(local_store, "_rename_new", boom)
    with pytest.raises(RuntimeError):
        ah.push(llama_rslora, uri(root), version="1.1.0")
    assert tree(root) == before  # the failed push cleaned up after itself
    monkeypatch.undo()

    # a process killed before its rename leaves its temporary folder behind; versions and resolution ignore it
    script = (
        "import os, sys; from adapterhub_cli.stores import local;"
        "local._rename_new = lambda *a: os._exit(9);"
        "import adapterhub_cli as ah; ah.push(sys.argv[1], sys.argv[2], version='1.1.0')"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(llama_rslora), uri(root)], check=False)
    assert proc.returncode == 9
    versions_dir = root / "acme" / "lora" / "versions"
    leftovers = [p for p in versions_dir.iterdir() if p.name.endswith(".incomplete")]
    assert len(leftovers) == 1 and (leftovers[0] / MANIFEST).is_file()
    assert [v.tag for v in ah.versions(uri(root))] == ["v1.0.0"] and LocalStore().resolve(uri(root)).tag == "v1.0.0"
    assert all(tree(root)[k] == v for k, v in before.items())

    ah.push(llama_rslora, uri(root), version="1.1.0")  # the next push sweeps the dead push's folder
    assert sorted(p.name for p in versions_dir.iterdir()) == ["1.0.0", "1.1.0"]


def test_nothing_is_written_outside_the_root(tmp_path: Path, llama_lora: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        ah.push(llama_lora, f"file://{tmp_path}/missing-root/acme/lora", version="1.0.0")
    assert not (tmp_path / "missing-root").exists()
    for bad in (f"file://{tmp_path}/acme/..", f"file://{tmp_path}/a/../acme/lora", f"file://{tmp_path}/acme/l@ra/x"):
        r = run_cli("push", str(llama_lora), bad, "--version", "1.0.0")
        assert r.exit_code != 0 and "Traceback" not in r.output, bad
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -------------------------------------------------------------------- refs in every command that takes one


def test_refs_work_wherever_an_adapter_or_a_base_is_taken(
    root: Path, llama_base: Path, llama_lora: Path, llama_rslora: Path, tmp_path: Path
) -> None:
    ah.push(llama_base, uri(root, "acme/llama"), version="1.0.0", force=True)
    ah.push(llama_lora, uri(root), version="1.0.0")
    ah.push(llama_rslora, uri(root), version="1.2.0")
    ref = uri(root, rev="1.2.0")

    lora = ah.load(ref)
    local = ah.load(llama_rslora)
    assert sorted(lora.modules) == sorted(local.modules)
    assert lora.provenance.source.startswith(uri(root) + "@") and len(lora.provenance.source.split("@")[1]) == 64
    m = next(iter(lora.modules))
    assert lora.factors(m).A.equal(local.factors(m).A) and lora.factors(m).B.equal(local.factors(m).B)

    r = run_cli("inspect", ref, "--json")
    assert r.exit_code == 0, r.output
    r = run_cli("diff", uri(root, rev="1.0.0"), ref, "--json")
    assert r.exit_code == 0, r.output
    base = uri(root, "acme/llama", "^1")
    r = run_cli("validate", ref, "--base", base)
    assert r.exit_code == 0, r.output
    r = run_cli("reduce", ref, "--rank", "2", "-o", str(tmp_path / "reduced"))
    assert r.exit_code == 0, r.output

    r = run_cli("merge", ref, "--into", base, "-o", str(tmp_path / "from-store"))
    assert r.exit_code == 0, r.output
    ah.merge(llama_rslora, base=llama_base, out=tmp_path / "from-folder")
    same_model(tmp_path / "from-store", tmp_path / "from-folder")


# ------------------------------------------------------------------------------------------ diffusers bases


@pytest.fixture(scope="module")
def unet_and_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A diffusers UNet component folder and a PEFT adapter for it (converted from a kohya file)."""
    pytest.importorskip("diffusers")
    import fixtures_diffusion as fd

    return fd.build_unet_and_lora(tmp_path_factory.mktemp("unet"))


def test_a_merged_unet_pushes_and_pulls(root: Path, unet_and_lora: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder written by `merge --into <UNet folder>` (diffusion_pytorch_model.safetensors) publishes like
    any merged model, and comes back byte for byte."""
    unet, lora = unet_and_lora
    r = run_cli("merge", str(lora), "--into", str(unet), "-o", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / "diffusion_pytorch_model.safetensors").is_file()
    r = run_cli("push", str(tmp_path / "merged"), uri(root, "acme/unet-merged"), "--version", "1.0.0")
    assert r.exit_code == 0, r.output
    r = run_cli("pull", uri(root, "acme/unet-merged", "latest"), "-o", str(tmp_path / "pulled"))
    assert r.exit_code == 0, r.output
    for name, data in tree(tmp_path / "merged").items():  # the card is the push's (it adds the repo and version)
        if name != "README.md":
            assert (tmp_path / "pulled" / name).read_bytes() == data, name
    assert "model merged with LoRA adapters" in (tmp_path / "pulled" / "README.md").read_text()


def test_merge_into_a_unet_in_the_registry(root: Path, unet_and_lora: tuple[Path, Path], tmp_path: Path) -> None:
    unet, lora = unet_and_lora
    ah.push(unet, uri(root, "acme/unet"), version="1.0.0", force=True)
    r = run_cli("validate", str(lora), "--base", uri(root, "acme/unet", "1.0.0"))
    assert r.exit_code == 0, r.output
    r = run_cli("merge", str(lora), "--into", uri(root, "acme/unet", "1.0.0"), "-o", str(tmp_path / "from-store"))
    assert r.exit_code == 0, r.output
    ah.merge(lora, base=unet, out=tmp_path / "from-folder")
    same_model(tmp_path / "from-store", tmp_path / "from-folder")
    assert (tmp_path / "from-store" / "diffusion_pytorch_model.safetensors").is_file()
