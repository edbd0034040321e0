"""`merge` under faults: a killed merge (SIGKILL, SIGTERM, SIGHUP) or a full disk leaves no output folder, an existing
output is replaced only with --overwrite, and the inputs are never modified."""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import status_and_output as cli
from peft_helpers import read_checkpoint, tree_sha256

import adapterhub_cli as ah


ENGINE = importlib.import_module("adapterhub_cli.merge.engine")
DIRECT_IO = importlib.import_module("adapterhub_cli.merge.direct_io")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ------------------------------------------------------------------------------- SIGKILL

KILLED_MERGE = textwrap.dedent(
    """
    import importlib, sys, time
    from pathlib import Path
    import adapterhub_cli as ah

    adapter, base, out, marker = sys.argv[1:]
    shards = importlib.import_module("adapterhub_cli.merge.shards")
    direct_io = importlib.import_module("adapterhub_cli.merge.direct_io")
    write_tensor, write_placed = shards._write_tensor, direct_io.StagedFile.write_placed

    def stall():  # the first merged tensor: announce, then hang until killed
        Path(marker).touch()
        time.sleep(120)

    def stalled(sink, t):  # (a tensor copied into the staging chunks)
        stall()
        write_tensor(sink, t)

    def stalled_placed(sink, *args):  # (a tensor written from its own buffer)
        stall()
        write_placed(sink, *args)

    shards._write_tensor = stalled
    direct_io.StagedFile.write_placed = stalled_placed
    ah.merge(adapter, base=base, out=out)
    """
)


def test_killed_merge_leaves_no_output(llama_base, llama_lora, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out, marker = work / "merged", tmp_path / "writing"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MERGE, str(llama_lora), str(llama_base), str(out), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the merge never reached its first merged tensor"
            time.sleep(0.05)
        temp = list(work.glob(".merged.*.incomplete"))
        assert len(temp) == 1 and (temp[0] / "model.safetensors").exists()  # mid-way through the shard
        assert not out.exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # a SIGKILLed process cannot clean up: the only trace is its clearly named temporary folder
    assert leftovers(work) == [temp[0].name]

    # the next merge to the same OUT is not disturbed by the stale folder
    ah.merge(llama_lora, base=llama_base, out=out)
    assert (out / "model.safetensors").exists()


# ------------------------------------------------------------------------------- SIGTERM / SIGHUP

TERMINATED_MERGE = textwrap.dedent(
    """
    import importlib, sys, time
    from pathlib import Path
    from adapterhub_cli.cli.main import main

    marker = sys.argv.pop(1)
    compute = importlib.import_module("adapterhub_cli.merge.compute")
    apply = compute._Merger.apply

    def stalled(self, plan, weight, *args, **kwargs):  # the first merged tensor: announce, then wait (main thread)
        Path(marker).touch()
        time.sleep(120)
        return apply(self, plan, weight, *args, **kwargs)

    compute._Merger.apply = stalled
    sys.argv[0] = "adapters"
    main()
    """
)


def _merge_until_signal(args: list[object], marker: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run ``adapters merge ARGS`` in a fresh process, send ``sig`` once it is merging its first tensor."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TERMINATED_MERGE, str(marker), "merge", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the merge never reached its first merged tensor"
            time.sleep(0.05)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output.decode())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminated_merge_cleans_up_like_ctrl_c(llama_base_sharded, llama_lora, tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    before = {p: tree_sha256(p) for p in (llama_lora, llama_base_sharded)}
    done = _merge_until_signal(
        [llama_lora, "--into", llama_base_sharded, "-o", out, "--max-shard-size", "100KB"], tmp_path / "m", sig
    )
    assert done.returncode == 128 + sig, done.stdout  # the shell's status for a signal
    assert "Traceback" not in done.stdout
    assert leftovers(work) == []  # no output, and the temporary folder is gone
    assert {p: tree_sha256(p) for p in (llama_lora, llama_base_sharded)} == before


def test_terminated_overwrite_keeps_the_previous_output(llama_base, llama_lora, llama_rslora, tmp_path):
    out = tmp_path / "merged"
    ah.merge(llama_lora, base=llama_base, out=out)
    previous = tree_sha256(out)
    done = _merge_until_signal(
        [llama_rslora, "--into", llama_base, "-o", out, "--overwrite"], tmp_path / "m", signal.SIGTERM
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stdout
    assert leftovers(tmp_path) == ["m", "merged"] and tree_sha256(out) == previous


# ---------------------------------------------------------------------------- full disk


class _FullDisk:
    """Stands in for the ``os`` module of the merge's file writer: ``write`` / ``pwrite`` fail with ENOSPC after
    ``allowed`` calls; ``copy_file_range`` (raw copies) is refused so those bytes go through ``write`` too."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        self.calls += 1
        if self.calls > self.allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def pwrite(self, fd: int, data, offset: int) -> int:
        self.calls += 1
        if self.calls > self.allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, offset)

    def copy_file_range(self, *args, **kwargs) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))


@pytest.mark.parametrize("direct", ["1", "0"], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("allowed", [0, 5])
def test_full_disk_gives_clear_error_and_no_output(
    llama_base_sharded, llama_lora, tmp_path, monkeypatch, allowed, direct
):
    disk = _FullDisk(allowed)
    monkeypatch.setattr(DIRECT_IO, "os", disk)
    monkeypatch.setenv("ADAPTERS_DIRECT_IO", direct)
    out = tmp_path / "merged"
    code, output = cli("merge", llama_lora, "--into", llama_base_sharded, "-o", out, "--max-shard-size", "100KB")
    assert disk.calls == allowed + 1  # it failed where the disk filled up, and did not go on writing
    assert code == 2, output
    assert "No space left" in output and "Traceback" not in output
    assert leftovers(tmp_path) == []  # no OUT, and the temporary folder is gone


# ---------------------------------------------------------------------------- overwrite


def test_existing_output_needs_overwrite(llama_base, llama_lora, llama_rslora, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = cli("merge", llama_lora, "--into", llama_base, "-o", out)
    assert code == 2 and "already exists" in output and "--overwrite" in output
    assert leftovers(out) == ["keep.txt"] and leftovers(tmp_path) == ["merged"]

    # --overwrite replaces only an earlier output of adapters: a folder the user made is kept
    code, output = cli("merge", llama_lora, "--into", llama_base, "-o", out, "--overwrite")
    assert code == 2 and "not written by adapters" in output and "Traceback" not in output
    assert leftovers(out) == ["keep.txt"] and leftovers(tmp_path) == ["merged"]

    (out / "keep.txt").unlink()
    out.rmdir()
    code, output = cli("merge", llama_lora, "--into", llama_base, "-o", out, "--json")
    assert code == 0, output
    assert json.loads(output)["path"] == str(out)
    files = [".adapters-output", "README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert leftovers(out) == files
    assert leftovers(tmp_path) == ["merged"]  # no temporary folder left behind

    # replacing one merge with another
    first = read_checkpoint(out)
    ah.merge(llama_rslora, base=llama_base, out=out, overwrite=True)
    assert leftovers(tmp_path) == ["merged"]  # no temporary or old folder left behind
    ah.merge(llama_rslora, base=llama_base, out=tmp_path / "fresh")
    second, fresh = read_checkpoint(out), read_checkpoint(tmp_path / "fresh")
    assert all(torch.equal(second[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(second[k], first[k]) for k in first)
    with pytest.raises(FileExistsError):
        ah.merge(llama_lora, base=llama_base, out=out)


# -------------------------------------------------------------------------- inputs kept


def test_inputs_never_modified(llama_base_sharded, roberta_base, llama_lora, roberta_lora, copy_adapter, tmp_path):
    cases = [
        (copy_adapter(llama_lora), copy_adapter(llama_base_sharded), {"max_shard_size": "100KB", "dtype": "bf16"}),
        (copy_adapter(roberta_lora), copy_adapter(roberta_base), {}),  # modules_to_save copies replace tensors
    ]
    for i, (adapter, base, kwargs) in enumerate(cases):
        before = {p: tree_sha256(p) for p in (adapter, base)}
        mtimes = {p: p.stat().st_mtime_ns for p in (adapter, base)}
        ah.merge(adapter, base=base, out=tmp_path / f"m{i}", **kwargs)
        ah.unmerge(adapter, merged=tmp_path / f"m{i}", out=tmp_path / f"u{i}")
        assert {p: tree_sha256(p) for p in (adapter, base)} == before
        assert {p: p.stat().st_mtime_ns for p in (adapter, base)} == mtimes  # nothing added or removed


# ------------------------------------------------------------------------------- a write error never hangs

HANGING_MERGE = textwrap.dedent(
    """
    import errno, faulthandler, importlib, sys, time
    import adapterhub_cli as ah

    adapter, base, out = sys.argv[1:]
    shards = importlib.import_module("adapterhub_cli.merge.shards")
    real = shards._BaseReader.copy_raw

    def copy_raw(self, key, sink, check=None):  # the untouched embedding, written first: slow, then the disk is full
        if "embed_tokens" in key:
            time.sleep(2)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(self, key, sink, check)

    shards._BaseReader.copy_raw = copy_raw
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where it waits
    try:
        ah.merge(adapter, base=base, out=out)
    except OSError as e:
        print("refused:", e)
    """
)


def _embedding_first(base: Path, out: Path) -> Path:
    """A copy of ``base`` whose safetensors file holds the embedding first, then every linear weight."""
    import shutil
    import struct

    shutil.copytree(base, out)
    f = out / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    meta = header.pop("__metadata__", None)
    keys = sorted(header, key=lambda k: (("embed_tokens" not in k), not k.endswith("proj.weight"), k))
    new, blobs, at = ({"__metadata__": meta} if meta else {}), [], 0
    for k in keys:
        a, b = header[k]["data_offsets"]
        new[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"], "data_offsets": [at, at + b - a]}
        blobs.append(data[a:b])
        at += b - a
    head = json.dumps(new).encode()
    head += b" " * (-len(head) % 8)
    f.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return out


def test_a_write_error_with_merged_tensors_queued_behind_it_fails_the_merge_and_never_hangs(
    llama_base, llama_all_linear, tmp_path
):
    """A write that fails (a full disk) while the merged tensors queued behind it hold every staging buffer: the
    skipped writes give their buffers back, the merge fails with the disk's error and leaves nothing."""
    base = _embedding_first(llama_base, tmp_path / "base")
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", HANGING_MERGE, str(llama_all_linear), str(base), str(work / "merged")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "refused: [Errno 28] No space left on device (injected)" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0 and leftovers(work) == []
