"""The plugin layer: a toy format plugin and a command plugin registered in-test, used through API and CLI."""

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
from adapterhub_cli.plugins import manager as plugins


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


class ToyPlugin:
    @ah.hookimpl
    def adapters_register_formats(self, register):
        register(ToyFormat())

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
    listed = {p.name: p for p in plugins.list_plugins()}
    assert listed["adapterhub_cli.formats.builtin"].source == "built-in"
    assert listed["adapterhub_cli.formats.builtin"].hooks == ["adapters_register_formats"]
    assert listed["adapterhub_cli.cli.commands"].hooks == ["adapters_register_commands"]


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
    with pytest.raises(ah.UnknownFormatError, match="known formats: diffusers, kohya, lycoris, peft"):
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
