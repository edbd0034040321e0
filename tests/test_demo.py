"""``adapters demo``: builds a tiny base and adapter locally and runs inspect and validate on them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli


@pytest.fixture(autouse=True)
def _private_hash_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path_factory.mktemp("adapters_cache")))


def test_demo_builds_and_reports(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    res = CliRunner().invoke(build_cli(), ["demo", "--dir", str(root)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    base, adapter = root / "base", root / "adapter"

    # the files it promises
    for f in (base / "config.json", base / "model.safetensors"):
        assert f.is_file(), f
    for f in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors"):
        assert f.is_file(), f
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)

    # the inspect step: its summary, module table and spectrum
    assert f"$ adapters inspect {adapter} --modules --spectrum" in out
    rep = ah.inspect(adapter, modules=True, spectrum=True)
    assert rep.num_modules == 6  # q/v/o_proj x 2 layers
    assert re.search(r"^r\s+8\s*$", out, re.MULTILINE)
    assert re.search(r"^lora_alpha\s+16\s*$", out, re.MULTILINE)
    assert re.search(r"^scale\s+2\s+\(alpha/r\)", out, re.MULTILINE)
    assert re.search(r"^modules\s+6\s*$", out, re.MULTILINE)
    assert rep.sha256 is not None and rep.sha256 in out
    assert "spectrum of dW" in out
    assert rep.spectrum is not None
    assert all(s.fro_norm > 0 for s in rep.spectrum)  # B was filled with noise: a real update
    assert f"{rep.spectrum[0].fro_norm:.4g}" in out
    assert "zero update" not in out

    # the validate step: an OK verdict
    assert f"$ adapters validate {adapter} --base {base}" in out
    assert re.search(r"^OK: the adapter fits the base \(0 warning\(s\)\); 6 modules checked", out, re.MULTILINE), out
    report = ah.validate(adapter, base=base)
    assert report.ok and report.errors == []
    assert f"The example stays in {root}" in out
