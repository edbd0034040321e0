"""The plugin layer: a toy format (read and write), a combine method and a command registered in-test, used
through the API and the CLI; the built-ins register through the same hooks."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.formats.peft import assemble_adapter
from adapterhub_cli.ops.methods import get_method
from adapterhub_cli.plugins import manager as plugins
from lora_ops import LoraFactors, concat


class ToyFormat:
    """A JSON file holding a PEFT config and PEFT-named tensors as nested lists (``*.toylora``)."""

    name = "toy"
    description = "toy JSON adapter (test plugin)"

    def sniff(self, path: Path) -> bool:
        return path.suffix == ".toylora"

    def read(self, path: Path) -> ah.Adapter:
        doc = json.loads(path.read_text())
        tensors = {k: torch.tensor(v) for k, v in doc["tensors"].items()}
        return assemble_adapter(path, doc["config"], tensors=tensors, format_name=self.name)

    def write(self, adapter: ah.Adapter, path: Path, *, overwrite: bool = False) -> Path:
        if path.exists() and not overwrite:
            raise FileExistsError(path)
        names = [k for m in adapter.modules.values() for k in (m.A.name, m.B.name)]
        tensors = {k: v.tolist() for k, v in adapter.source.load(names).items()}
        path.write_text(json.dumps({"config": adapter.config.raw, "tensors": tensors}))
        return path


def mean(factors: list[LoraFactors], weights: list[float], *, rank: int | None = None) -> LoraFactors:
    """The weighted mean of the updates (test plugin)."""
    total = sum(weights)
    return concat(factors, [w / total for w in weights])


class ToyPlugin:
    @ah.hookimpl
    def adapters_register_formats(self, register):
        register(ToyFormat())

    @ah.hookimpl
    def adapters_register_methods(self, register):
        register("mean", mean, reference="https://example.org/mean")

    @ah.hookimpl
    def adapters_register_commands(self, cli):
        import click

        @cli.command("hello")
        def hello() -> None:
            """Say hello (test plugin)."""
            click.echo("hello from the toy plugin")


@pytest.fixture
def toy_plugin():
    plugin = ToyPlugin()
    plugins.load_plugins()
    plugins.pm.register(plugin, name="toy-plugin")
    try:
        yield plugin
    finally:
        plugins.pm.unregister(plugin)


@pytest.fixture
def toy_file(llama_lora, tmp_path) -> Path:
    tensors = load_file(llama_lora / "adapter_model.safetensors")
    config = json.loads((llama_lora / "adapter_config.json").read_text())
    path = tmp_path / "my.toylora"
    path.write_text(json.dumps({"config": config, "tensors": {k: v.tolist() for k, v in tensors.items()}}))
    return path


def test_toy_format_through_api(toy_plugin, toy_file, llama_lora):
    adapter = ah.load(toy_file)
    assert adapter.format == "toy"
    reference = ah.load(llama_lora)
    assert set(adapter.modules) == set(reference.modules)
    report = ah.inspect(adapter, modules=True)
    assert report.r == 8 and report.lora_alpha == 16 and report.scale == 2.0
    assert report.num_parameters == reference.num_parameters
    name = next(iter(reference.modules))
    a, b = adapter.factors(name), reference.factors(name)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scale == b.scale


def test_toy_format_through_cli(toy_plugin, toy_file, llama_base):
    runner = CliRunner()
    cli = build_cli()
    res = runner.invoke(cli, ["inspect", str(toy_file), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["format"] == "toy" and data["r"] == 8 and data["num_modules"] == 4
    res = runner.invoke(cli, ["validate", str(toy_file), "--base", str(llama_base)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["hello"])
    assert res.exit_code == 0 and "hello from the toy plugin" in res.output
    res = runner.invoke(cli, ["plugins", "--json"])
    listed = json.loads(res.stdout)
    assert any(p["name"] == "toy-plugin" and "adapters_register_formats" in p["hooks"] for p in listed["plugins"])
    assert listed["formats"]["toy"] == ToyFormat.description
    assert "peft" in listed["formats"]


def test_builtins_register_through_the_same_hooks():
    build_cli()  # registers the built-in commands, the one built-in plugin that lives in cli/
    listed = {p.name: p for p in plugins.list_plugins()}
    assert listed["adapterhub_cli.formats.builtin"].source == "built-in"
    assert listed["adapterhub_cli.formats.builtin"].hooks == ["adapters_register_formats"]
    assert listed["adapterhub_cli.ops.builtin_methods"].source == "built-in"
    assert listed["adapterhub_cli.ops.builtin_methods"].hooks == ["adapters_register_methods"]
    assert listed["adapterhub_cli.cli.commands"].source == "built-in"
    assert listed["adapterhub_cli.cli.commands"].hooks == ["adapters_register_commands"]
    assert not [m for m in plugins.BUILTIN_PLUGINS if m.startswith("adapterhub_cli.cli")]  # the API never imports cli/
    assert get_method("ties").plugin == "adapterhub_cli.ops.builtin_methods"


def test_toy_method_through_api(toy_plugin, llama_lora, llama_rslora, tmp_path):
    weights = [3.0, 1.0]
    result = ah.combine([llama_lora, llama_rslora], tmp_path / "mean", weights=weights, method="mean")
    cat = ah.combine([llama_lora, llama_rslora], tmp_path / "cat", weights=[0.75, 0.25], method="cat")
    assert result.method == "mean"
    ours, theirs = ah.load(result.path), ah.load(cat.path)
    one, two = ah.load(llama_lora), ah.load(llama_rslora)
    shared = set(one.modules) & set(two.modules)
    assert shared and set(ours.modules) - shared  # the mean is per module, over the adapters that have it
    for name in ours.modules:
        a = ours.factors(name)
        b = (theirs if name in shared else one if name in one.modules else two).factors(name)
        torch.testing.assert_close(a.scale * a.B @ a.A, b.scale * b.B @ b.A)
    method = get_method("mean")
    assert method.plugin == "toy-plugin" and method.params == ("rank",) and method.required == ()
    assert method.description == "The weighted mean of the updates (test plugin)."
    assert ah.load(result.path).provenance.operation == "combine"


def test_toy_method_and_format_through_cli(toy_plugin, llama_lora, llama_rslora, tmp_path):
    runner = CliRunner()
    cli = build_cli()
    res = runner.invoke(cli, ["combine", "--help"])
    assert "mean" in res.output
    res = runner.invoke(
        cli, ["combine", str(llama_lora), str(llama_rslora), "--method", "mean", "-o", str(tmp_path / "m"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "mean"
    res = runner.invoke(cli, ["convert", str(llama_lora), "--to", "toy", "-o", str(tmp_path / "x.toylora"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["to"] == "toy"
    back = ah.load(tmp_path / "x.toylora")
    assert back.format == "toy" and set(back.modules) == set(ah.load(llama_lora).modules)
    res = runner.invoke(cli, ["plugins", "--json"])
    listed = json.loads(res.stdout)
    assert listed["methods"]["mean"] == {
        "description": "The weighted mean of the updates (test plugin).",
        "reference": "https://example.org/mean",
        "params": ["rank"],
        "plugin": "toy-plugin",
    }
    assert listed["methods"]["ties"]["params"] == ["rank", "density"]
    assert listed["methods"]["dare_ties"]["params"] == ["rank", "density", "seed"]
    assert "toy" in listed["writable_formats"] and "lycoris" not in listed["writable_formats"]
    toy = next(p for p in listed["plugins"] if p["name"] == "toy-plugin")
    assert toy["hooks"] == ["adapters_register_commands", "adapters_register_formats", "adapters_register_methods"]


def test_toy_format_writes_through_api(toy_plugin, llama_lora, tmp_path):
    result = ah.convert(llama_lora, tmp_path / "y.toylora", to="toy")
    assert result.to == "toy" and result.source_format == "peft" and result.path == tmp_path / "y.toylora"
    back, ref = ah.load(result.path), ah.load(llama_lora)
    for name in ref.modules:
        assert torch.equal(back.factors(name).A, ref.factors(name).A)


def test_unknown_method_lists_the_known_ones(toy_plugin, llama_lora, tmp_path):
    with pytest.raises(ah.UsageError, match=r"known methods: cat, linear, svd, ties, .*magnitude_prune, mean"):
        ah.combine([llama_lora], tmp_path / "x", method="nope")
    res = CliRunner().invoke(build_cli(), ["combine", str(llama_lora), "--method", "nope", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "unknown combine method 'nope'; known: cat, linear" in res.output and "mean" in res.output
    assert not (tmp_path / "x").exists()


def test_a_required_option_is_a_usage_error(llama_lora, llama_rslora, tmp_path):
    with pytest.raises(ah.UsageError, match="--density is required for ties"):
        ah.combine([llama_lora, llama_rslora], tmp_path / "t", method="ties")


def test_a_format_that_cannot_write_is_no_convert_target(llama_lora, tmp_path):
    with pytest.raises(ah.UnknownFormatError, match="'lycoris' can read but not write; formats that can write: peft"):
        ah.convert(llama_lora, tmp_path / "l", to="lycoris")
    with pytest.raises(ah.UnknownFormatError, match="'nope' is not a known format"):
        ah.convert(llama_lora, tmp_path / "l", to="nope")
    res = CliRunner().invoke(build_cli(), ["convert", str(llama_lora), "--to", "lycoris", "-o", str(tmp_path / "l")])
    assert res.exit_code == 2 and "known: peft, kohya, diffusers" in res.output


def _registered(plugin, name):
    plugins.load_plugins()
    plugins.pm.register(plugin, name=name)
    return plugin


def test_method_signatures_are_checked_when_collected(llama_lora, tmp_path):
    def needs_temperature(factors, weights, *, temperature):
        return concat(factors, weights)

    class Bad:
        @ah.hookimpl
        def adapters_register_methods(self, register):
            register("hot", needs_temperature)

    bad = _registered(Bad(), "bad")
    try:
        with pytest.raises(ah.PluginError, match="'hot' of plugin 'bad' requires argument 'temperature'"):
            ah.combine([llama_lora], tmp_path / "x", method="cat")
    finally:
        plugins.pm.unregister(bad)


def test_a_method_result_is_checked(llama_lora, tmp_path):
    class Wrong:
        @ah.hookimpl
        def adapters_register_methods(self, register):
            register("none", lambda factors, weights: None, description="returns nothing")
            register("transposed", lambda fs, ws: LoraFactors(fs[0].B.T, fs[0].A.T, 1.0), description="wrong shape")

    wrong = _registered(Wrong(), "wrong")
    try:
        with pytest.raises(ah.PluginError, match="'none' \\(plugin 'wrong'\\) returned a NoneType"):
            ah.combine([llama_lora], tmp_path / "x", method="none")
        with pytest.raises(ah.PluginError, match="'transposed' \\(plugin 'wrong'\\) returned factors of shape"):
            ah.combine([llama_lora], tmp_path / "x", method="transposed")
        assert not (tmp_path / "x").exists()
    finally:
        plugins.pm.unregister(wrong)


def test_duplicate_method_name_is_refused(llama_lora, tmp_path):
    class Dup:
        @ah.hookimpl
        def adapters_register_methods(self, register):
            register("ties", mean)

    dup = _registered(Dup(), "dup")
    try:
        with pytest.raises(ah.PluginError, match="'dup' registers combine method 'ties', already registered by"):
            ah.combine([llama_lora], tmp_path / "x", method="cat")
    finally:
        plugins.pm.unregister(dup)


def test_a_plugin_command_cannot_replace_a_builtin(llama_lora):
    class Shadow:
        @ah.hookimpl
        def adapters_register_commands(self, cli):
            import click

            @cli.command("inspect")
            def fake() -> None:
                click.echo("shadowed")

    shadow = _registered(Shadow(), "shadow")
    try:
        res = CliRunner().invoke(build_cli(), ["inspect", str(llama_lora)])
        assert res.exit_code == 0, res.output
        assert "shadowed" not in res.output
        assert "plugin 'shadow': command 'inspect' already exists; ignored" in res.output
    finally:
        plugins.pm.unregister(shadow)


def test_duplicate_format_name_is_refused(llama_lora):
    class Dup:
        @ah.hookimpl
        def adapters_register_formats(self, register):
            fmt = ToyFormat()
            fmt.name = "peft"
            register(fmt)

    dup = Dup()
    plugins.pm.register(dup, name="dup")
    try:
        with pytest.raises(ah.PluginError, match="already registered"):
            ah.load(llama_lora)
    finally:
        plugins.pm.unregister(dup)


def test_unknown_format_name_lists_known(llama_lora):
    with pytest.raises(ah.UnknownFormatError, match="known formats: diffusers, gguf, kohya, lycoris, peft"):
        ah.load(llama_lora, format="nope")


def test_broken_entry_point_becomes_a_warning(monkeypatch, llama_lora):
    broken = EntryPoint(name="broken", value="no_such_module_xyz:plugin", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [broken])
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "load_errors", [])
    monkeypatch.delenv("ADAPTERS_LOAD_PLUGINS", raising=False)
    res = CliRunner().invoke(build_cli(), ["inspect", str(llama_lora)])
    assert res.exit_code == 0, res.output
    assert "plugin 'broken'" in res.output and "failed to load" in res.output
    assert "ModuleNotFoundError" in res.output


def test_env_var_restricts_entry_points(monkeypatch):
    loaded = []
    ep = EntryPoint(name="other", value="json", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [ep])
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins.pm, "register", lambda plugin, name=None: loaded.append(name))
    monkeypatch.setenv("ADAPTERS_LOAD_PLUGINS", "")
    plugins.load_plugins()
    assert "other" not in loaded
