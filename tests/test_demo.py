"""``adapters demo``: builds a tiny base and adapter locally and runs inspect and validate on them."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
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


def _console_script() -> list[str]:
    exe = shutil.which("adapters") or str(Path(sys.executable).with_name("adapters"))
    return [exe] if Path(exe).is_file() else [sys.executable, "-c", "from adapterhub_cli.cli.main import main; main()"]


def test_demo_piped_is_clean_and_its_commands_copyable(tmp_path: Path) -> None:
    """Piped (as into a file or `less`): no third-party progress bars or warnings on either stream, no line
    ending in spaces, and every echoed command on one line, quoted for the shell, however long its paths."""
    root = tmp_path / ("a-folder-with-a-long-name-" * 5) / "demo dir"  # commands of 200+ columns, a space to quote
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # a pipe's own default width
    proc = subprocess.run(
        [*_console_script(), "demo", "--dir", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "it/s" not in stream and "%|" not in stream  # tqdm's marks
        assert not [line for line in stream.splitlines() if line.endswith(" ")]
    # only our own warnings (none expected), never a library's (bitsandbytes, transformers, torch)
    assert [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")] == []
    assert not re.search(r"bitsandbytes|transformers|UserWarning|FutureWarning|DeprecationWarning", proc.stderr)

    echoed = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert len(echoed) == 7
    assert max(len(line) for line in echoed) > 200  # longer than any terminal would fit: still one line each
    commands = {"inspect", "validate", "reduce", "diff", "combine", "quantize", "merge"}
    for line in echoed:
        args = shlex.split(line[2:])
        assert args[0] == "adapters" and args[1] in commands, line
        commands.discard(args[1])
        paths = [a for a in args if a.startswith("/")]
        assert paths and all(Path(p).parent == root for p in paths), line
        assert all(Path(p).exists() for p in paths), line  # whole paths: inputs and the outputs written
    assert commands == set()
    tail = proc.stdout.splitlines()[-1]
    assert tail.startswith(f"The example stays in {root}; try `adapters inspect ")
    assert shlex.split(tail.split("`")[1]) == ["adapters", "inspect", str(root / "adapter"), "--json"]


def test_build_demo_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The API builds the demo silently: transformers' bars and warnings stay off, and its settings come back."""
    from transformers.utils import logging as hf_logging

    from adapterhub_cli.ops.demo import build_demo

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    base, adapter = build_demo(tmp_path / "d")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file()
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()) == (bars, verbosity)
