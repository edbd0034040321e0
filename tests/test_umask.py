"""Outputs follow the umask: every writing command's folders are 0o777 and its files 0o666, less the umask (the
temporary folder an output is written in must not keep ``mkdtemp``'s private 0o700).

The commands run in a child process whose umask is set first (the umask belongs to the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


_CHILD = r"""
import json, os, stat, sys
from pathlib import Path

from click.testing import CliRunner

from adapterhub_cli.cli.main import build_cli

adapter, base, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
modes = {}
for mask in (0o022, 0o027, 0o077):
    os.umask(mask)
    o = root / f"umask-{mask:03o}"  # made by the first command, under the umask too
    commands = [
        ["reduce", adapter, "--rank", "4", "-o", str(o / "reduced")],
        ["combine", adapter, str(o / "reduced"), "-o", str(o / "combined")],
        ["quantize", adapter, "--to", "int8", "-o", str(o / "int8")],
        ["dequantize", str(o / "int8"), "-o", str(o / "dequantized")],
        ["convert", adapter, "--to", "kohya", "--base", base, "-o", str(o / "kohya.safetensors")],
        ["convert", adapter, "--to", "gguf", "--base", base, "-o", str(o / "adapter.gguf")],
        ["convert", str(o / "kohya.safetensors"), "--to", "peft", "--base", base, "-o", str(o / "peft")],
        ["merge", adapter, "--into", base, "-o", str(o / "merged"), "--max-shard-size", "100KB"],
        ["unmerge", adapter, "--from", str(o / "merged"), "-o", str(o / "unmerged")],
    ]
    for args in commands:
        res = CliRunner().invoke(build_cli(), args)
        assert res.exit_code == 0, (args, res.output)
    found = {}
    for dirpath, dirnames, filenames in os.walk(o):
        for name in [*dirnames, *filenames, *([""] if dirpath == str(o) else [])]:
            p = Path(dirpath, name)
            found[str(p.relative_to(root))] = [stat.S_ISDIR(p.lstat().st_mode), stat.S_IMODE(p.lstat().st_mode)]
    modes[f"{mask:03o}"] = found
print(json.dumps(modes))
"""


@pytest.fixture(scope="module")
def modes(llama_lora: Path, llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("umask")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(llama_lora), str(llama_base), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mask", ["022", "027", "077"])
def test_outputs_follow_the_umask(modes: dict[str, dict], mask: str) -> None:
    found = modes[mask]
    umask = int(mask, 8)
    outputs = {p.split("/")[1] for p in found if p.count("/") >= 1}
    assert outputs >= {
        "reduced",
        "combined",
        "int8",
        "dequantized",
        "kohya.safetensors",
        "adapter.gguf",
        "peft",
        "merged",
        "unmerged",
    }
    assert any(p.endswith(".safetensors.index.json") for p in found)  # a sharded merge: index and shards too
    wrong = {
        path: oct(mode) for path, (is_dir, mode) in found.items() if mode != (0o777 if is_dir else 0o666) & ~umask
    }
    assert wrong == {}, f"umask {mask}: {wrong}"
    folders = [p for p, (is_dir, _) in found.items() if is_dir]
    assert len(folders) >= 8 and len(found) - len(folders) >= 20
