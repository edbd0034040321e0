"""The example plugin package (examples/adapterhub-cli-example-plugin), installed the way a user installs a plugin
(pip, an entry point in the group ``adapterhub_cli``), and each of its contributions used through the CLI and the
API: the ``onefile`` format, the ``mean`` combine method, the ``rank-histogram`` command and the ``zip`` store."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.plugins import manager as plugins


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adapterhub-cli-example-plugin"
DIST = "adapterhub-cli-example-plugin"
PLUGIN_HOOKS = [
    "adapters_register_commands",
    "adapters_register_formats",
    "adapters_register_methods",
    "adapters_register_stores",
]


def _install_by_hand(src: Path, target: Path) -> None:
    """What pip writes for this pure-Python package, for environments without setuptools (the build backend)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    shutil.copytree(src / "src" / "adapterhub_example_plugin", target / "adapterhub_example_plugin")
    info = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = project["entry-points"]["adapterhub_cli"]
    (info / "entry_points.txt").write_text("[adapterhub_cli]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the example plugin is installed into, offline, leaving the test environment untouched."""
    src = tmp_path_factory.mktemp("example-src") / "plugin"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("example-site")
    if importlib.util.find_spec("setuptools") is None:
        _install_by_hand(src, target)
        return target
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [*cmd, "--target", str(target), str(src)], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


@pytest.fixture
def example(site: Path, monkeypatch: pytest.MonkeyPatch):
    """The example plugin loaded from its entry point in this process (as ``load_plugins`` finds it)."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("ADAPTERS_LOAD_PLUGINS", "example")
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_sources", dict(plugins._sources))
    plugins.load_plugins()
    try:
        plugin = plugins.pm.get_plugin("example")
        assert plugin is not None, plugins.load_errors
        yield plugin
    finally:
        if plugins.pm.get_plugin("example") is not None:
            plugins.pm.unregister(name="example")
        for name in [m for m in sys.modules if m.startswith("adapterhub_example_plugin")]:
            del sys.modules[name]


_RUN = textwrap.dedent(
    """
    import json, sys
    from adapterhub_cli.cli.main import main
    sys.argv = ["adapters", *sys.argv[1:]]
    try:
        main()
    except SystemExit as e:
        code = e.code
    heavy = sorted(n for n in ("torch", "huggingface_hub") if n in sys.modules)
    print(json.dumps({"heavy": heavy}), file=sys.stderr)
    """
)


def _adapters(site: Path, *args: str) -> tuple[str, list[str]]:
    """Run ``adapters ARGS`` in a fresh process that finds the plugin through PYTHONPATH; stdout and the heavy
    modules it imported."""
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "ADAPTERS_LOAD_PLUGINS": "example"}
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc.stdout, status["heavy"]


def _factors_equal(one: ah.Adapter, two: ah.Adapter) -> None:
    assert set(one.modules) == set(two.modules)
    for name in one.modules:
        a, b = one.factors(name), two.factors(name)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scale == b.scale


@pytest.fixture
def bundle(llama_lora: Path, llama_patterns: Path, tmp_path: Path) -> Path:
    """A zip bundle with two versions of acme/lora (the second one with a rank_pattern), stored uncompressed."""
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for version, folder in (("1.0.0", llama_lora), ("1.1.0", llama_patterns)):
            for f in sorted(folder.iterdir()):
                zf.write(f, f"acme/lora/versions/{version}/{f.name}")
    return path


# ------------------------------------------------------------------------------------------- a fresh process


def test_a_fresh_process_lists_the_installed_plugin(site):
    stdout, heavy = _adapters(site, "plugins", "--json")
    listed = json.loads(stdout)
    example = next(p for p in listed["plugins"] if p["name"] == "example")
    assert example["source"] == f"{DIST} 0.1.0"
    assert example["hooks"] == PLUGIN_HOOKS
    assert "onefile" in listed["formats"] and "onefile" in listed["writable_formats"]
    assert listed["methods"]["mean"]["plugin"] == "example"
    assert listed["methods"]["mean"]["params"] == ["rank"]
    assert listed["stores"]["zip"]["plugin"] == "example"
    assert listed["errors"] == []
    assert heavy == []  # listing plugins, the example's included, imports neither torch nor huggingface_hub


def test_a_fresh_process_runs_the_plugin_command(site, llama_patterns):
    stdout, _ = _adapters(site, "--help")
    assert "rank-histogram" in stdout
    stdout, _ = _adapters(site, "rank-histogram", str(llama_patterns), "--json")
    ranks = {str(m.rank) for m in ah.load(llama_patterns).modules.values()}
    doc = json.loads(stdout)
    assert set(doc["ranks"]) == ranks and sum(doc["ranks"].values()) == len(ah.load(llama_patterns).modules)


# ------------------------------------------------------------------------------------------- in process


def test_format_through_api_and_cli(example, llama_lora, tmp_path):
    one = ah.convert(llama_lora, tmp_path / "lora.safetensors", to="onefile")
    assert one.to == "onefile" and one.path == tmp_path / "lora.safetensors" and one.path.is_file()
    adapter = ah.load(one.path)
    assert adapter.format == "onefile"
    _factors_equal(adapter, ah.load(llama_lora))
    runner = CliRunner()
    res = runner.invoke(build_cli(), ["inspect", str(one.path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["format"] == "onefile"
    res = runner.invoke(
        build_cli(), ["convert", str(one.path), "--to", "peft", "-o", str(tmp_path / "back"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["from"] == "onefile"
    _factors_equal(ah.load(tmp_path / "back"), ah.load(llama_lora))
    res = runner.invoke(build_cli(), ["convert", str(llama_lora), "--to", "onefile", "-o", str(tmp_path / "x.bin")])
    assert res.exit_code == 2 and "a onefile adapter is one .safetensors file" in res.output


def test_method_through_api_and_cli(example, llama_lora, llama_patterns, tmp_path):
    result = ah.combine([llama_lora, llama_lora], tmp_path / "mean", weights=[1.0, 3.0], method="mean")
    assert result.method == "mean"
    mean, original = ah.load(result.path), ah.load(llama_lora)
    for name in original.modules:
        m, o = mean.factors(name), original.factors(name)
        torch.testing.assert_close(m.scale * m.B @ m.A, o.scale * o.B @ o.A)  # the mean of one update is itself
    res = CliRunner().invoke(
        build_cli(),
        [
            "combine",
            str(llama_lora),
            str(llama_patterns),
            "--method",
            "mean",
            "--rank",
            "2",
            "-o",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert {m.rank for m in ah.load(tmp_path / "c").modules.values()} == {2}


def test_command_through_build_cli(example, llama_lora):
    res = CliRunner().invoke(build_cli(), ["rank-histogram", str(llama_lora)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("rank    8      4  ")


def test_store_through_api_and_cli(example, bundle, llama_lora, llama_patterns, tmp_path):
    repo = f"zip://{bundle}/acme/lora"
    assert [v.tag for v in ah.versions(repo)] == ["v1.1.0", "v1.0.0"]
    _factors_equal(ah.load(f"{repo}@1.0.0"), ah.load(llama_lora))
    _factors_equal(ah.load(f"{repo}@^1.0"), ah.load(llama_patterns))
    runner = CliRunner()
    res = runner.invoke(build_cli(), ["inspect", f"{repo}@~1.0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["r"] == ah.inspect(llama_lora).r
    res = runner.invoke(build_cli(), ["pull", f"{repo}@latest", "-o", str(tmp_path / "pulled"), "--json"])
    assert res.exit_code == 0, res.output
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "pulled" / name).read_bytes() == (llama_patterns / name).read_bytes()
    res = runner.invoke(build_cli(), ["push", str(llama_lora), repo, "--version", "2.0.0"])
    assert res.exit_code == 2 and "zip bundles are read-only" in res.output


def test_a_zipped_file_registry_is_a_bundle(example, llama_lora, tmp_path):
    (tmp_path / "registry").mkdir()
    ah.push(llama_lora, f"file://{tmp_path}/registry/acme/lora", version="1.0.0")
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as zf:  # `cd registry && zip -r bundle.zip acme`, deflated this time
        for f in sorted((tmp_path / "registry").rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path / "registry").as_posix())
    local = ah.versions(f"file://{tmp_path}/registry/acme/lora")
    zipped = ah.versions(f"zip://{bundle}/acme/lora")
    assert [(v.tag, v.commit) for v in zipped] == [(v.tag, v.commit) for v in local]  # same content id
    adapter = ah.load(f"zip://{bundle}/acme/lora@{local[0].commit}")
    _factors_equal(adapter, ah.load(llama_lora))
    assert adapter.provenance.source == f"zip://{bundle}/acme/lora@{local[0].commit}"
    zipped_pull = ah.pull(f"zip://{bundle}/acme/lora@1.0.0", out=tmp_path / "from-zip")
    local_pull = ah.pull(f"file://{tmp_path}/registry/acme/lora@1.0.0", out=tmp_path / "from-file")
    assert zipped_pull.files == local_pull.files and "README.md" in zipped_pull.files
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data.replace(b'"r": 8', b'"r": 4') if info.filename.endswith(".json") else data)
    with pytest.raises(ah.CorruptFileError, match="does not match its recorded sha256"):
        ah.load(f"zip://{tampered}/acme/lora@1.0.0")
