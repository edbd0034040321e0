"""Versioned adapters on the Hub, against a local Hub-compatible server (tests/hub_server.py) on 127.0.0.1.

The real ``huggingface_hub`` client talks HTTP to the server: push + tag, versions, pull of an older
version, ranges and ``latest``, header-only remote inspect / validate (the server counts the bytes it
serves), lazy weight downloads for merge (a bitsandbytes base's quant states by range requests), retries on
500 and dropped connections, clear 401 / 404 / tag conflicts, offline mode served from the cache, and the
token never showing up in any output.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli
from hub_server import FakeHub, serving

import adapterhub_cli as ah
from adapterhub_cli.artifact.ref import AdapterRef, Version, in_range, version_range
from adapterhub_cli.errors import CorruptFileError, HubAuthError, HubError, HubNotFoundError, VersionConflictError
from adapterhub_cli.stores.hf import client as hub_client


TOKEN = "hf_secret_token_do_not_print_8e1f"
WEIGHTS = "adapter_model.safetensors"

# huggingface_hub's LFS upload passes data= to httpx2, which deprecates it; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh server accepting ``TOKEN`` (also in ``HF_TOKEN``), with huggingface_hub pointed at it."""
    with serving(monkeypatch, tokens={TOKEN}, token=TOKEN) as server:
        yield server


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


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory: pytest.TempPathFactory, llama_lora: Path) -> Path:
    """An r=128 adapter on the llama base (~260 KB of weights: larger than one 100 kB header range read)."""
    return _random_lora(
        llama_lora,
        tmp_path_factory.mktemp("big") / "big_lora",
        r=128,
        d_in=64,
        d_outs={"q_proj": 64, "v_proj": 32},
        seed=0,
        scale=0.01,
        config={"lora_alpha": 256, "rank_pattern": {}, "alpha_pattern": {}},
    )


def _random_lora(
    template: Path,
    out: Path,
    *,
    r: int,
    d_in: int,
    d_outs: dict[str, int],
    seed: int,
    scale: float,
    config: dict,
) -> Path:
    """A seeded random PEFT adapter on the attention projections ``d_outs`` of 2 layers, with ``template``'s
    config updated by ``r`` and ``config``."""
    import torch

    from adapterhub_cli.formats.peft import peft_key, write_peft

    cfg = json.loads((template / "adapter_config.json").read_text())
    cfg.update(r=r, **config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for proj, d_out in d_outs.items():
            module = f"model.layers.{layer}.self_attn.{proj}"
            tensors[peft_key(module, "lora_A")] = torch.randn(r, d_in, generator=gen) * scale
            tensors[peft_key(module, "lora_B")] = torch.randn(d_out, r, generator=gen) * scale
    return write_peft(out, config=cfg, tensors=tensors, provenance={"operation": "test", "inputs": []})


@pytest.fixture(scope="module", params=["nf4", "int8"])
def bnb_sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved by transformers with bitsandbytes (nf4 / int8, quantized on CPU), in several shards."""
    import warnings

    pytest.importorskip("bitsandbytes")
    from bnb_fixtures import build_tiny_llama, load_quantized

    root = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(build_tiny_llama(root / "bf16"), request.param)
        model.save_pretrained(root / request.param, max_shard_size="100KB")
    assert len(list((root / request.param).glob("model-*.safetensors"))) >= 2
    return root / request.param


@pytest.fixture(scope="module")
def tiny_llama_lora(tmp_path_factory: pytest.TempPathFactory, llama_lora: Path) -> Path:
    """An r=4 adapter on q_proj / v_proj of the tiny Llama of ``bnb_fixtures.build_tiny_llama``."""
    return _random_lora(
        llama_lora,
        tmp_path_factory.mktemp("tiny_lora") / "lora",
        r=4,
        d_in=128,
        d_outs={"q_proj": 128, "v_proj": 64},
        seed=1,
        scale=0.05,
        config={"lora_alpha": 8, "base_model_name_or_path": "org/llama-bnb"},
    )


# ------------------------------------------------------------------------------------------ refs


@pytest.mark.parametrize(
    ("text", "repo", "rev", "kind"),
    [
        ("org/name@v1.2.0", "org/name", "v1.2.0", "version"),
        ("org/name@1.2.0", "org/name", "1.2.0", "version"),
        ("org/name@latest", "org/name", "latest", "latest"),
        ("org/name@^1.2", "org/name", "^1.2", "range"),
        ("org/name@~1.2", "org/name", "~1.2", "range"),
        ("org/name@main", "org/name", "main", "name"),
        ("org/name@" + "a" * 40, "org/name", "a" * 40, "commit"),
        ("org/name", "org/name", None, "default"),
        ("hf://org/name@refs/pr/1", "org/name", "refs/pr/1", "name"),
        ("hf://gpt2", "gpt2", None, "default"),
    ],
)
def test_ref_parse_round_trips(text: str, repo: str, rev: str | None, kind: str) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.repo_id, ref.revision, ref.kind) == (repo, rev, kind)
    assert str(ref) == text and AdapterRef.parse(str(ref)) == ref


def test_ref_local_paths_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    for text in ("./dir", "/abs/dir", "org/name", "lora"):
        ref = AdapterRef.parse(text)
        assert not ref.is_hub and str(ref) == text
    with pytest.raises(ah.UsageError):
        AdapterRef.parse("hf://not a repo")


def test_semver_order_and_ranges() -> None:
    vs = [Version.parse(t) for t in ("v1.10.0", "1.2.0", "1.2.0-rc.1", "0.9.9", "v2.0.0")]
    assert [str(v) for v in sorted(v for v in vs if v)] == ["0.9.9", "1.2.0-rc.1", "1.2.0", "1.10.0", "2.0.0"]
    caret, tilde, zero = version_range("^1.2"), version_range("~1.2"), version_range("^0.2")
    assert caret and tilde and zero
    assert in_range(Version(1, 10, 0), caret) and not in_range(Version(2, 0, 0), caret)
    assert in_range(Version(1, 2, 5), tilde) and not in_range(Version(1, 3, 0), tilde)
    assert in_range(Version(0, 2, 9), zero) and not in_range(Version(0, 3, 0), zero)
    assert not in_range(Version(1, 3, 0, "rc.1"), caret)  # prereleases only when asked for
    assert version_range("1.2.0") is None and Version.parse("1.2") is None


# ---------------------------------------------------------------------------- push / versions / pull


def test_push_versions_pull_older_version(hub: FakeHub, llama_lora: Path, llama_rslora: Path, tmp_path: Path) -> None:
    first = ah.push(llama_lora, "org/lora", version="1.0.0", message="first release")
    assert first.ref == "org/lora@v1.0.0" and len(first.commit) == 40
    assert first.validated_against == str(llama_lora.parent / "llama_base")  # the declared base, reachable
    second = ah.push(llama_rslora, "org/lora", version="1.1.0", message="rsLoRA on q/k/v/o")
    assert second.commit != first.commit

    versions = ah.versions("org/lora")
    assert [(v.tag, v.commit, v.message) for v in versions] == [
        ("v1.1.0", second.commit, "rsLoRA on q/k/v/o"),
        ("v1.0.0", first.commit, "first release"),
    ]
    assert all(v.date for v in versions)

    old = ah.pull("org/lora@v1.0.0", out=tmp_path / "old")
    assert (old.commit, old.tag) == (first.commit, "v1.0.0")
    assert (tmp_path / "old" / WEIGHTS).read_bytes() == (llama_lora / WEIGHTS).read_bytes()
    record = json.loads((tmp_path / "old" / ".adapters-pull.json").read_text())
    assert record["commit"] == first.commit and record["files"][WEIGHTS] == old.files[WEIGHTS]
    assert ah.load(tmp_path / "old").provenance.source == f"hf://org/lora@{first.commit}"

    assert ah.pull("org/lora@latest").commit == second.commit
    assert ah.pull("org/lora@^1.0").commit == second.commit
    assert ah.pull("org/lora@~1.0").commit == first.commit  # ~1.0 stays below 1.1.0
    assert ah.pull("org/lora@1.0.0").commit == first.commit  # a bare version finds tag v1.0.0
    assert ah.pull(f"org/lora@{first.commit}").commit == first.commit
    cached = ah.pull("org/lora")  # no revision: the latest release, files kept in the HF cache
    assert (
        cached.path.name == second.commit
        and (cached.path / WEIGHTS).read_bytes() == (llama_rslora / WEIGHTS).read_bytes()
    )
    assert set(cached.files) == {"adapter_config.json", "README.md", WEIGHTS}  # only the adapter's files


def test_push_writes_card_and_refuses_tag_conflicts(hub: FakeHub, llama_lora: Path, llama_rslora: Path) -> None:
    v1 = ah.push(llama_lora, "org/lora", version="1.0.0", base_model="org/llama")
    card = (Path(ah.pull("org/lora@v1.0.0").path) / "README.md").read_text()
    assert "base_model: org/llama" in card and "base_model_relation: adapter" in card
    assert "library_name: peft" in card and "- lora" in card
    assert "| `model.layers.0.self_attn.q_proj` | 64 x 64 | 8 | 16 | 2 |" in card  # modules and ranks
    assert TOKEN not in card

    with pytest.raises(VersionConflictError, match=r"org/lora@v1\.0\.0 already exists"):
        ah.push(llama_rslora, "org/lora", version="1.0.0", force=True)  # an existing tag never moves
    with pytest.raises(VersionConflictError, match="lower than the latest"):
        ah.push(llama_rslora, "org/lora", version="0.9.0")
    with pytest.raises(ah.UsageError, match="semantic version"):
        ah.push(llama_rslora, "org/lora", version="one")
    assert [v.tag for v in ah.versions("org/lora")] == ["v1.0.0"]
    assert ah.versions("org/lora")[0].commit == v1.commit

    older = ah.push(llama_rslora, "org/lora", version="0.9.0", force=True)
    assert [v.tag for v in ah.versions("org/lora")] == ["v1.0.0", "v0.9.0"]
    assert ah.pull("org/lora@latest").commit == v1.commit and older.commit != v1.commit


def test_push_refuses_an_invalid_adapter(hub: FakeHub, copy_adapter: Callable[..., Path], llama_lora: Path) -> None:
    broken = copy_adapter(llama_lora)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["r"] = 4  # the tensors have rank 8
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ah.IncompatibleBaseError, match="rank-mismatch"):
        ah.push(broken, "org/broken", version="1.0.0")
    assert not hub.hits("POST", r"/commit/")


def test_push_validates_against_a_declared_hub_base(
    hub: FakeHub, copy_adapter: Callable[..., Path], llama_base: Path, llama_base_wide: Path, llama_lora: Path
) -> None:
    ah.push(llama_base, "org/llama", version="1.0.0", force=True)
    ah.push(llama_base_wide, "org/wide", version="1.0.0", force=True)
    lora = copy_adapter(llama_lora)
    cfg_path = lora / "adapter_config.json"

    def declare(base: str) -> None:
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": base}))

    declare("org/llama")
    hub.served.clear()
    pushed = ah.push(lora, "org/lora", version="1.0.0")
    assert pushed.validated_against == "org/llama" and not pushed.warnings
    assert 0 < hub.served_bytes("org/llama", "model.safetensors") < hub.file_size("org/llama", "model.safetensors")
    card = (Path(ah.pull("org/lora").path) / "README.md").read_text()
    assert "base_model: org/llama\n" in card and "base_model_relation: adapter" in card

    declare("org/wide")  # hidden 96: the adapter's shapes do not fit
    with pytest.raises(ah.IncompatibleBaseError, match="shape"):
        ah.push(lora, "org/lora", version="1.1.0")
    declare("org/absent")
    pushed = ah.push(lora, "org/lora", version="1.1.0")
    assert pushed.validated_against is None and "org/absent is not reachable" in pushed.warnings[0]


# ----------------------------------------------------------------------------- header-only reads


def test_remote_inspect_reads_only_headers(hub: FakeHub, big_lora: Path) -> None:
    ah.push(big_lora, "org/big", version="1.0.0")
    size = hub.file_size("org/big", WEIGHTS)
    assert size > 200_000
    hub.requests.clear()
    hub.served.clear()

    report = ah.inspect("org/big@v1.0.0", modules=True)
    local = ah.inspect(big_lora, modules=True)
    assert (report.r, report.num_modules, report.num_parameters) == (128, 4, local.num_parameters)
    assert report.modules == local.modules and report.path == "org/big@v1.0.0"
    assert report.sha256 == local.sha256 and report.file_size == local.file_size == size  # from the Hub's listing
    gets = hub.hits("GET", rf"/resolve/.*/{WEIGHTS}$")
    assert gets and all(r["range"] for r in gets)  # range requests only
    assert 0 < hub.served_bytes("org/big", WEIGHTS) < size // 2  # no full weight file went out

    cli = run_cli("inspect", "org/big@v1.0.0", "--json")
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["num_modules"] == 4
    assert hub.served_bytes("org/big", WEIGHTS) < size

    lora = ah.load("hf://org/big@v1.0.0")  # weights arrive when first needed, hash-checked, once
    assert lora.tensor_file is None
    factors = lora.factors("model.layers.0.self_attn.q_proj")
    assert factors.A.shape == (128, 64) and lora.tensor_file is not None
    assert hub.served_bytes("org/big", WEIGHTS) >= size


def test_validate_against_a_hub_base_reads_only_headers(hub: FakeHub, llama_base: Path, llama_lora: Path) -> None:
    base = ah.push(llama_base, "org/llama", version="1.0.0", base_model="org/llama-pretrained", force=True)
    assert "model.safetensors" in base.files
    card = (Path(ah.pull("org/llama@v1.0.0").path) / "README.md").read_text()
    assert "base_model: org/llama-pretrained" in card and "base_model_relation: merge" in card
    size = hub.file_size("org/llama", "model.safetensors")
    hub.served.clear()

    report = ah.validate(llama_lora, base="org/llama@v1.0.0")
    assert report.ok, report.findings
    assert report.base == "org/llama@v1.0.0"
    assert 0 < hub.served_bytes("org/llama", "model.safetensors") < size

    cli = run_cli("validate", "org/lora-missing@v1.0.0", "--base", "org/llama@v1.0.0")
    assert cli.exit_code == 2 and "org/lora-missing" in cli.output


def test_merge_fetches_hub_weights_on_demand(hub: FakeHub, llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    ah.push(llama_base, "org/llama", version="1.0.0", force=True)
    ah.push(llama_lora, "org/lora", version="1.0.0")
    local = ah.merge(llama_lora, base=llama_base, out=tmp_path / "local")
    remote = ah.merge("org/lora@v1.0.0", base="org/llama@v1.0.0", out=tmp_path / "remote")
    assert remote.tensors_merged == local.tensors_merged > 0
    same_model(tmp_path / "local", tmp_path / "remote")
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["hidden_size"] == 64


def test_a_hub_bnb_base_is_dequantized_without_downloading_shards(
    hub: FakeHub, bnb_sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_cli.artifact.checkpoint import open_base
    from adapterhub_cli.merge import bnb
    from adapterhub_cli.stores.hf import pull as hub_module
    from adapterhub_cli.stores.hf.store import HfStore

    ah.push(bnb_sharded, "org/llama-bnb", version="1.0.0", force=True)
    shards = sorted(p.name for p in bnb_sharded.glob("model-*.safetensors"))
    fetched: list[str] = []
    fetch_file = hub_module.fetch_file
    monkeypatch.setattr(
        hub_module, "fetch_file", lambda resolved, name, **kw: fetched.append(name) or fetch_file(resolved, name, **kw)
    )

    stored = HfStore().open_base("org/llama-bnb@v1.0.0")
    hub.requests.clear()
    hub.served.clear()  # the headers are read (the first 100 kB of each shard): now what dequantizing reads
    hub.fail("GET", r"/resolve/.*\.safetensors$", kind="drop")  # a range read is retried like any Hub call
    remote = bnb.logical_view(stored)
    if bnb.bnb_scheme(stored.config) == "nf4":
        assert hub.faults[0].remaining == 0  # the dropped read was retried
    hub.faults.clear()
    assert not [n for n in fetched if n.endswith(".safetensors")]  # nf4 quant states came by range requests
    assert all(r["range"] for r in hub.hits("GET", r"/resolve/.*\.safetensors$"))
    read = {s: hub.served_bytes("org/llama-bnb", s) for s in shards}
    assert sum(read.values()) < 4096 and all(n < hub.file_size("org/llama-bnb", s) // 10 for s, n in read.items())
    local = bnb.logical_view(open_base(bnb_sharded))
    assert {k: (t.dtype, t.shape) for k, t in remote.tensors.items()} == {
        k: (t.dtype, t.shape) for k, t in local.tensors.items()
    }
    q = "model.layers.0.self_attn.q_proj.weight"
    assert remote.tensors[q].shape == (128, 128) and remote.tensors[q].dtype in ("BF16", "F16")
    assert remote.path == stored.path == Path("org/llama-bnb@v1.0.0")

    fetched_shard = remote.shard_of[q]  # the first read fetches that shard alone; both views follow it
    assert fetched_shard.is_file() and fetched_shard.name in shards
    assert [n for n in fetched if n.endswith(".safetensors")] == [fetched_shard.name]
    assert remote.path == stored.path == fetched_shard.parent and (remote.path / "config.json").is_file()


def test_merge_into_a_hub_bnb_base_streams_its_shards(
    hub: FakeHub, bnb_sharded: Path, tiny_llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_cli.merge import bnb
    from adapterhub_cli.stores.hf import pull as hub_module
    from adapterhub_cli.stores.records import Resolved

    ah.push(bnb_sharded, "org/llama-bnb", version="1.0.0", force=True)
    local = ah.merge(tiny_llama_lora, base=bnb_sharded, out=tmp_path / "local")
    events: list[str] = []
    fetch_file, logical_view = hub_module.fetch_file, bnb.logical_view

    def fetch_spy(resolved: Resolved, name: str, **kw: Any) -> Path:
        if name.endswith(".safetensors"):
            events.append(name)
        return fetch_file(resolved, name, **kw)

    def view_spy(view: Any, read: Any = None) -> Any:
        out = logical_view(view, read)
        events.append("logical view")
        return out

    monkeypatch.setattr(hub_module, "fetch_file", fetch_spy)
    monkeypatch.setattr(bnb, "logical_view", view_spy)
    remote = ah.merge(tiny_llama_lora, base="org/llama-bnb@v1.0.0", out=tmp_path / "remote")
    assert remote.tensors_merged == local.tensors_merged == 4
    shards = sorted(p.name for p in bnb_sharded.glob("model-*.safetensors"))
    assert events[0] == "logical view" and sorted(events[1:]) == shards  # each shard once, as the merge reaches it
    same_model(tmp_path / "local", tmp_path / "remote")
    assert (tmp_path / "remote" / "config.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "remote" / "config.json").read_text())


def test_an_injected_api_is_used_for_everything(hub: FakeHub, llama_lora: Path, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    other = FakeHub(tokens={"hf_other"}).start()
    try:
        api = HfApi(endpoint=other.url, token="hf_other")
        pushed = ah.push(llama_lora, "org/lora", version="1.0.0", api=api)
        assert [v.tag for v in ah.versions("org/lora", api=api)] == ["v1.0.0"]
        assert ah.pull("org/lora@latest", out=tmp_path / "p", api=api).commit == pushed.commit
        assert len(ah.load("org/lora@v1.0.0", api=api).modules) == 4
        assert other.hits("GET", "/resolve/") and not hub.requests  # the default endpoint saw nothing
    finally:
        other.stop()


def test_legacy_bin_needs_allow_pickle(hub: FakeHub, llama_lora: Path, tmp_path: Path) -> None:
    import torch
    from huggingface_hub import CommitOperationAdd, HfApi
    from safetensors.torch import load_file

    state = load_file(llama_lora / WEIGHTS)
    torch.save(state, tmp_path / "adapter_model.bin")
    api = HfApi()
    api.create_repo("org/legacy")
    api.create_commit(
        "org/legacy",
        operations=[
            CommitOperationAdd("adapter_config.json", str(llama_lora / "adapter_config.json")),
            CommitOperationAdd("adapter_model.bin", str(tmp_path / "adapter_model.bin")),
        ],
        commit_message="legacy",
    )
    with pytest.raises(ah.InvalidAdapterError, match="legacy pickle") as info:
        ah.pull("org/legacy")
    assert "--allow-pickle" in str(info.value.hint)
    with pytest.raises(ah.InvalidAdapterError, match="legacy pickle"):
        ah.load("org/legacy")
    pulled = ah.pull("org/legacy", allow_pickle=True, out=tmp_path / "p")
    assert set(pulled.files) == {"adapter_config.json", "adapter_model.bin"}
    lora = ah.load("org/legacy", allow_pickle=True)
    assert len(lora.modules) == 4 and lora.path == Path(f"org/legacy@{pulled.commit}")


def test_hub_refs_feed_diff_reduce_combine_and_the_lineage(
    hub: FakeHub, llama_lora: Path, llama_rslora: Path, tmp_path: Path
) -> None:
    ah.push(llama_lora, "org/a", version="1.0.0")
    ah.push(llama_rslora, "org/b", version="1.0.0")
    assert ah.diff("org/a@v1.0.0", "org/a").verdict == "identical"
    ah.reduce("org/a@v1.0.0", tmp_path / "r", rank=4)
    ah.combine(["org/a@v1.0.0", "org/b@latest"], tmp_path / "c")
    inputs = json.loads(ah.load(tmp_path / "c").metadata["adapterhub.provenance"])["inputs"]
    assert [i["source"] for i in inputs] == ["org/a@v1.0.0", "org/b@v1.0.0"]  # @latest recorded as its tag
    assert inputs[0]["sha256"] == ah.pull("org/a@v1.0.0").files[WEIGHTS]

    ah.push(tmp_path / "c", "org/c", version="0.1.0", base_model="org/llama")
    card = (Path(ah.pull("org/c").path) / "README.md").read_text()
    assert "Produced by `combine`" in card and f"| `org/b@v1.0.0` | `{inputs[1]['sha256']}` |" in card


# ------------------------------------------------------------------------------------- reliability


def test_500_then_success_and_dropped_connections_are_retried(hub: FakeHub, llama_lora: Path, tmp_path: Path) -> None:
    hub.fail("POST", r"/api/repos/create", kind="500")
    hub.fail("POST", r"/api/models/org/lora/commit/", kind="drop")
    pushed = ah.push(llama_lora, "org/lora", version="1.0.0")
    assert len(hub.hits("POST", r"/commit/main")) == 2

    hub.fail("GET", r"/api/models/org/lora/refs", kind="500")
    hub.fail("GET", r"/api/models/org/lora/revision/", kind="drop")
    pulled = ah.pull("org/lora@v1.0.0", out=tmp_path / "out")
    assert pulled.commit == pushed.commit
    assert [r["status"] for r in hub.hits("GET", r"/api/models/org/lora/refs")][-2:] == [500, 200]
    assert [r["status"] for r in hub.hits("GET", r"/api/models/org/lora/revision/")][-2:] == [-1, 200]


def test_lost_commit_answer_is_recognised(hub: FakeHub, llama_lora: Path) -> None:
    """The commit lands but its answer is lost: the retry's 412 is matched to our own commit, then tagged."""
    hub.fail("POST", r"/commit/main", kind="drop-after")
    pushed = ah.push(llama_lora, "org/lora", version="1.0.0")
    assert [r["status"] for r in hub.hits("POST", r"/commit/main")] == [-1, 412]
    assert ah.versions("org/lora")[0].commit == pushed.commit


def test_interrupted_push_leaves_the_previous_version(hub: FakeHub, llama_lora: Path, llama_rslora: Path) -> None:
    v1 = ah.push(llama_lora, "org/lora", version="1.0.0")
    hub.fail("POST", r"/commit/main", kind="drop", times=hub_client.RETRIES + 1)
    with pytest.raises(HubError, match="did not answer"):
        ah.push(llama_rslora, "org/lora", version="1.1.0")
    assert [v.tag for v in ah.versions("org/lora")] == ["v1.0.0"]
    assert ah.pull("org/lora@latest").commit == v1.commit
    assert ah.pull("org/lora").commit == v1.commit


def test_bad_token_gives_a_clear_401(hub: FakeHub, llama_lora: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    bad = "hf_wrong_token_1234567890"
    with pytest.raises(HubAuthError, match=r"401.*org/lora") as info:
        ah.versions("org/lora", token=bad)
    assert info.value.repo_id == "org/lora" and info.value.status == 401
    monkeypatch.setenv("HF_TOKEN", bad)
    for args in (("versions", "org/lora"), ("pull", "org/lora@v1.0.0"), ("inspect", "org/lora@v1.0.0")):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert "401" in result.output and "org/lora" in result.output and "HF_TOKEN" in result.output
        assert bad not in result.output and "Traceback" not in result.output


def test_cli_formats_raw_huggingface_hub_errors(hub: FakeHub, llama_lora: Path) -> None:
    """A huggingface_hub error that escapes the Hub layer still becomes one line, without the token."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from adapterhub_cli.cli._errors import format_known_exception

    ah.push(llama_lora, "org/lora", version="1.0.0")
    bad = "hf_wrong_token_1234567890"
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(token=bad).list_repo_refs("org/lora")
    message = format_known_exception(info.value)
    assert message is not None and "401" in message and "HF_TOKEN" in message and bad not in message
    with pytest.raises(HfHubHTTPError) as info:
        HfApi().list_repo_refs("org/nope")
    message = format_known_exception(info.value)
    assert message is not None and "404" in message and "org/nope" in message


def test_not_found_errors_name_repo_and_revision(hub: FakeHub, llama_lora: Path) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    with pytest.raises(HubNotFoundError, match="repository org/nope not found"):
        ah.pull("org/nope@v1.0.0")
    with pytest.raises(HubNotFoundError, match=r"no version of org/lora matches 'v9\.9\.9'.*v1\.0\.0"):
        ah.pull("org/lora@v9.9.9")
    with pytest.raises(HubNotFoundError, match="revision 'no-such-branch' not found in org/lora"):
        ah.pull("org/lora@no-such-branch")
    result = run_cli("pull", "org/lora@^2")
    assert result.exit_code == 2 and "org/lora" in result.output and "adapters versions" in result.output


def test_tampered_weights_are_refused(hub: FakeHub, llama_lora: Path) -> None:
    ah.push(llama_lora, "org/lora", version="1.0.0")
    sha = next(iter(hub.lfs))
    hub.lfs[sha] = hub.lfs[sha][:-4] + b"\0\0\0\0"  # the store now serves other bytes under the same sha256
    with pytest.raises(CorruptFileError, match="sha256"):
        ah.pull("org/lora@v1.0.0")


def test_offline_mode_is_served_from_the_cache(
    hub: FakeHub, llama_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    pushed = ah.push(llama_lora, "org/lora", version="1.0.0")
    ah.pull("org/lora@v1.0.0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert ah.pull("org/lora@v1.0.0").commit == pushed.commit
    assert ah.pull("org/lora@latest").commit == pushed.commit
    assert len(ah.load("org/lora@v1.0.0").modules) == 4
    assert len(hub.requests) == before  # not one request
    with pytest.raises(HubError, match="offline mode"):
        ah.pull("org/other@v1.0.0")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_push_pull_versions_never_print_the_token(hub: FakeHub, llama_lora: Path, tmp_path: Path) -> None:
    outputs = []
    pushed = run_cli("push", str(llama_lora), "org/lora", "--version", "1.0.0", "-m", "first", "--token", TOKEN)
    outputs.append(pushed.output)
    assert pushed.exit_code == 0, pushed.output
    assert "org/lora@v1.0.0" in pushed.output and "commit " in pushed.output

    again = run_cli("push", str(llama_lora), "org/lora", "--version", "1.0.0", "--token", TOKEN)
    outputs.append(again.output)
    assert again.exit_code == 2 and "already exists" in again.output

    versions = run_cli("versions", "org/lora", "--json", "--token", TOKEN)
    outputs.append(versions.output)
    rows = json.loads(versions.output)
    assert [(r["tag"], r["version"], r["message"]) for r in rows] == [("v1.0.0", "1.0.0", "first")]
    table = run_cli("versions", "org/lora")
    outputs.append(table.output)
    assert "v1.0.0" in table.output and rows[0]["commit"][:12] in table.output

    pulled = run_cli("pull", "org/lora@latest", "-o", str(tmp_path / "p"), "--json", "--token", TOKEN)
    outputs.append(pulled.output)
    assert json.loads(pulled.output)["commit"] == rows[0]["commit"]
    assert (tmp_path / "p" / WEIGHTS).is_file()
    readme = (tmp_path / "p" / "README.md").read_text()
    assert all(TOKEN not in text for text in [*outputs, readme])
    shutil.rmtree(tmp_path / "p")


# ---------------------------------------------------------------------------------------- diffusers components


@pytest.fixture(scope="module")
def unet_and_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A diffusers UNet component folder (``diffusion_pytorch_model.safetensors``) and a PEFT adapter for it."""
    pytest.importorskip("diffusers")
    import fixtures_diffusion as fd

    return fd.build_unet_and_lora(tmp_path_factory.mktemp("unet"))


def test_a_merged_unet_pushes_and_pulls(hub: FakeHub, unet_and_lora: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder written by `merge --into <UNet folder>` publishes like any merged model (it was refused: no
    model.safetensors) and pulls back byte for byte."""
    unet, lora = unet_and_lora
    r = run_cli("merge", str(lora), "--into", str(unet), "-o", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    r = run_cli("push", str(tmp_path / "merged"), "org/unet-merged", "--version", "1.0.0", "--json")
    assert r.exit_code == 0, r.output
    assert "diffusion_pytorch_model.safetensors" in json.loads(r.output)["files"]
    r = run_cli("pull", "org/unet-merged@v1.0.0", "-o", str(tmp_path / "pulled"))
    assert r.exit_code == 0, r.output
    for p in (tmp_path / "merged").iterdir():  # the card is the push's (it adds the repo and version)
        if p.name != "README.md":
            assert (tmp_path / "pulled" / p.name).read_bytes() == p.read_bytes(), p.name


def test_merge_into_a_hub_unet(hub: FakeHub, unet_and_lora: tuple[Path, Path], tmp_path: Path) -> None:
    """A diffusers component on the Hub is a base like any other: validated and merged into from its headers
    and its one weight file, the output named as diffusers names it."""
    unet, lora = unet_and_lora
    ah.push(unet, "org/unet", version="1.0.0", force=True)
    r = run_cli("validate", str(lora), "--base", "org/unet@v1.0.0")
    assert r.exit_code == 0, r.output
    r = run_cli("merge", str(lora), "--into", "org/unet@v1.0.0", "-o", str(tmp_path / "remote"))
    assert r.exit_code == 0, r.output
    ah.merge(lora, base=unet, out=tmp_path / "local")
    same_model(tmp_path / "local", tmp_path / "remote")
    assert (tmp_path / "remote" / "diffusion_pytorch_model.safetensors").is_file()
