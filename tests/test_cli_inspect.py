"""``adapters inspect`` / ``plugins`` / ``--help`` through click's runner, plus the installed entry point.

The JSON output is checked against the Python API (the CLI is a thin shell over it), the human output
for the values a user looks for, and the error boundary for exit status 2 without a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import run_cli

import adapterhub_cli as ah


@pytest.fixture(autouse=True)
def _private_hash_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """sha256 digests are cached on disk; keep that cache out of the user's home (subprocesses inherit it)."""
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path_factory.mktemp("adapters_cache")))


def field(output: str, key: str) -> str:
    """The value printed next to ``key`` in inspect's key / value block."""
    m = re.search(rf"^{re.escape(key)}\s+(.*?)\s*$", output, re.MULTILINE)
    assert m is not None, f"no {key!r} row in:\n{output}"
    return m.group(1)


def table_row(output: str, first_cell: str) -> list[str]:
    """The other cells of the rich table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        cells = [c for c in cells if c != ""] if cells and cells[0] == "" else cells
        if cells and cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no table row for {first_cell!r} in:\n{output}")


# ----------------------------------------------------------------------------- human output


def test_inspect_human_output(llama_lora: Path) -> None:
    res = run_cli("inspect", str(llama_lora))
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert field(out, "r") == "8"
    assert field(out, "lora_alpha") == "16"
    assert field(out, "scale") == "2  (alpha/r)"
    assert field(out, "modules") == "4"
    assert field(out, "target_modules") == "q_proj, v_proj"
    assert field(out, "parameters") == "3,584"
    assert field(out, "DoRA") == "no"
    assert field(out, "task type") == "CAUSAL_LM"
    assert field(out, "base model") == str(llama_lora.parent / "llama_base")
    weights = llama_lora / "adapter_model.safetensors"
    assert field(out, "sha256") == ah.inspect(llama_lora).sha256
    assert field(out, "file").startswith(str(weights))
    assert res.stderr == ""


def test_inspect_human_output_rslora_and_patterns(llama_rslora: Path, llama_patterns: Path) -> None:
    out = run_cli("inspect", str(llama_rslora)).stdout
    assert field(out, "scale") == f"{16 / math.sqrt(8):g}  (alpha/sqrt(r), rsLoRA)"
    assert field(out, "modules") == "8"

    res = run_cli("inspect", str(llama_patterns), "--modules")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert field(out, "r") == "8 (ranks present: [2, 4, 8])"
    assert "'up_proj': 32" in field(out, "alpha_pattern")
    # module table: name, d_out x d_in, r, alpha, scale, dtype
    assert table_row(out, "model.layers.1.self_attn.q_proj")[:5] == ["64 x 64", "2", "16", "8", "F32"]
    assert table_row(out, "model.layers.0.mlp.up_proj")[:5] == ["128 x 64", "8", "32", "4", "F32"]
    assert table_row(out, "model.layers.0.self_attn.v_proj")[:5] == ["32 x 64", "4", "16", "4", "F32"]
    assert table_row(out, "model.layers.0.self_attn.q_proj")[:5] == ["64 x 64", "8", "16", "2", "F32"]


def test_inspect_human_spectrum_table(llama_dora: Path) -> None:
    res = run_cli("inspect", str(llama_dora), "--spectrum")
    assert res.exit_code == 0, res.output
    spectra = ah.inspect(llama_dora, spectrum=True).spectrum
    assert spectra is not None
    for s in spectra:
        cells = table_row(res.stdout, s.name)
        assert cells[:3] == [f"{s.fro_norm:.4g}", str(s.effective_rank_90), str(s.effective_rank_99)]
        assert cells[3].startswith(f"{s.singular_values[0]:.3g}, ")


# ------------------------------------------------------------------------------------ JSON


def test_inspect_json_matches_api(llama_lora: Path) -> None:
    res = run_cli("inspect", str(llama_lora), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    api = json.loads(json.dumps(ah.inspect(llama_lora).to_dict()))
    assert doc == api
    assert (doc["r"], doc["lora_alpha"], doc["scale"], doc["scale_rule"]) == (8, 16, 2.0, "alpha/r")
    assert doc["num_modules"] == 4
    assert doc["num_parameters"] == 3584
    assert doc["modules"] is None and doc["spectrum"] is None


def test_inspect_json_no_hash(llama_lora: Path) -> None:
    doc = json.loads(run_cli("inspect", str(llama_lora), "--json", "--no-hash").stdout)
    assert doc["sha256"] is None
    assert doc["file_size"] == (llama_lora / "adapter_model.safetensors").stat().st_size


def test_inspect_json_modules_and_spectrum(llama_patterns: Path) -> None:
    res = run_cli("inspect", str(llama_patterns), "--json", "--modules", "--spectrum")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    api = ah.inspect(llama_patterns, modules=True, spectrum=True)
    assert api.modules is not None and api.spectrum is not None
    rows = {m["name"]: m for m in doc["modules"]}
    assert len(rows) == doc["num_modules"] == 6
    for m in api.modules:
        assert rows[m.name] == {
            "name": m.name,
            "kind": m.kind,
            "d_out": m.d_out,
            "d_in": m.d_in,
            "rank": m.rank,
            "alpha": m.alpha,
            "scale": m.scale,
            "dtype": m.dtype,
            "dora": m.dora,
        }
    assert rows["model.layers.1.self_attn.q_proj"]["rank"] == 2
    assert rows["model.layers.1.self_attn.q_proj"]["scale"] == 8.0
    spectra = {s["name"]: s for s in doc["spectrum"]}
    assert set(spectra) == set(rows)
    for s in api.spectrum:
        got = spectra[s.name]
        assert got["singular_values"] == pytest.approx(s.singular_values, rel=1e-12)
        assert len(got["singular_values"]) == rows[s.name]["rank"]
        assert got["fro_norm"] == pytest.approx(s.fro_norm, rel=1e-12)
        assert got["fro_norm"] == pytest.approx(math.sqrt(sum(x * x for x in got["singular_values"])), rel=1e-12)
        assert (got["effective_rank_90"], got["effective_rank_99"]) == (s.effective_rank_90, s.effective_rank_99)


# -------------------------------------------------------------------------------- bare files


def test_bare_safetensors_uses_sibling_config(llama_patterns: Path) -> None:
    weights = llama_patterns / "adapter_model.safetensors"
    res = run_cli("inspect", str(weights), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    folder = json.loads(run_cli("inspect", str(llama_patterns), "--json").stdout)
    assert doc["warnings"] == []
    assert doc["path"] == str(weights)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "ranks", "target_modules", "num_parameters"):
        assert doc[key] == folder[key], key
    assert doc["rank_pattern"] == {"v_proj": 4, "model.layers.1.self_attn.q_proj": 2}
    assert doc["sha256"] == folder["sha256"]


def test_bare_safetensors_alone_infers_config(llama_lora: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    weights = alone / "adapter_model.safetensors"
    shutil.copyfile(llama_lora / "adapter_model.safetensors", weights)

    res = run_cli("inspect", str(weights), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["r"] == 8
    assert doc["ranks"] == [8]
    assert doc["target_modules"] == ["q_proj", "v_proj"]
    assert doc["num_modules"] == 4
    assert any("no adapter_config.json" in w and "inferred" in w for w in doc["warnings"]), doc["warnings"]
    assert doc["lora_alpha"] == 8  # assumed equal to r, and said so
    assert any("lora_alpha 8" in w for w in doc["warnings"])

    res = run_cli("inspect", str(weights))
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "no adapter_config.json" in res.stderr
    assert field(res.stdout, "r") == "8"


# ----------------------------------------------------------------------------------- plugins


def test_plugins_lists_builtins_and_peft_format() -> None:
    res = run_cli("plugins", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    builtin = {p["name"]: p for p in doc["plugins"] if p["source"] == "built-in"}
    assert set(builtin) >= {"adapterhub_cli.formats.builtin", "adapterhub_cli.cli.commands"}
    assert "adapters_register_formats" in builtin["adapterhub_cli.formats.builtin"]["hooks"]
    assert "adapters_register_commands" in builtin["adapterhub_cli.cli.commands"]["hooks"]
    assert "peft" in doc["formats"]
    assert "adapter_config.json" in doc["formats"]["peft"]
    assert doc["errors"] == []

    res = run_cli("plugins")
    assert res.exit_code == 0, res.output
    assert "adapterhub_cli.formats.builtin" in res.stdout
    assert "adapterhub_cli.cli.commands" in res.stdout
    assert re.search(r"^\S*\s*peft\s", res.stdout, re.MULTILINE), res.stdout


# ------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["inspect"], ["validate"], ["plugins"], ["demo"]])
def test_help_exits_zero(command: list[str]) -> None:
    res = run_cli(*command, "--help")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Usage: ")
    if not command:
        for name in ("inspect", "validate", "plugins", "demo"):
            assert re.search(rf"^\s+{name}\s", res.stdout, re.MULTILINE), res.stdout
    if command == ["inspect"]:
        for opt in ("--modules", "--spectrum", "--json", "--no-hash"):
            assert opt in res.stdout


# ------------------------------------------------------------------------------------ errors


def test_missing_path_is_a_clean_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    res = run_cli("inspect", str(missing))
    assert res.exit_code == 2
    assert res.stdout == ""
    first = res.stderr.splitlines()[0]
    assert first.startswith("Error: ")
    assert "not found" in first and str(missing) in first
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, ah.AdaptersError)  # handled: only the SystemExit(2) is left
    assert isinstance(res.exception, SystemExit)


def test_folder_without_config_is_a_clean_error(tmp_path: Path) -> None:
    res = run_cli("inspect", str(tmp_path))
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: ")
    assert "adapter_config.json" in res.stderr.splitlines()[0]
    assert "Traceback" not in res.output


def test_debug_env_propagates_the_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_DEBUG", "1")
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(ah.AdapterNotFoundError) as info:
        run_cli("inspect", str(missing), catch_exceptions=False)
    assert info.value.path == missing


# ------------------------------------------------------------------------- real processes

_INSPECT_IN_PROCESS = textwrap.dedent(
    """
    import json, sys
    import adapterhub_cli.cli.main as m
    sys.argv = ["adapters", "inspect", sys.argv[1], "--json", "--modules"]
    try:
        m.main()
        code = 0
    except SystemExit as e:
        code = e.code
    heavy = sorted(n for n in ("torch", "transformers", "peft", "numpy") if n in sys.modules)
    print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
    """
)


def test_inspect_never_imports_torch(llama_lora: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _INSPECT_IN_PROCESS, str(llama_lora)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ADAPTERS_LOAD_PLUGINS": ""},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status["code"] in (0, None)
    assert "torch" not in status["heavy"], status
    assert status["heavy"] == [], status
    doc = json.loads(proc.stdout)
    assert doc["r"] == 8 and doc["num_modules"] == 4 and len(doc["modules"]) == 4


def _console_script() -> list[str]:
    exe = shutil.which("adapters") or str(Path(sys.executable).with_name("adapters"))
    if Path(exe).is_file():
        return [exe]
    return [sys.executable, "-c", "from adapterhub_cli.cli.main import main; main()"]


def test_console_script_inspect(llama_rslora: Path) -> None:
    proc = subprocess.run(
        [*_console_script(), "inspect", str(llama_rslora), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["use_rslora"] is True
    assert doc["scale"] == pytest.approx(16 / math.sqrt(8))


def test_console_script_missing_path_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_console_script(), "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: ")
    assert "Traceback" not in proc.stderr
