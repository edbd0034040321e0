"""Outputs never destroy inputs, and non-finite numbers never reach an output.

A table of writing commands (reduce, combine, quantize, dequantize, merge, unmerge, convert to PEFT and to kohya,
pull) against a table of outputs that must be refused, each through the CLI (exit status 2, one ``Error:`` line, no
traceback) and the API (a typed error), with every input's bytes and every folder listing unchanged afterwards.
Every input was itself written by this tool, so ``--overwrite`` alone would accept it as an output: only the input
check stands between the command and the input. Then each writer is run for real: a 255-byte name given as a
relative path, a umask, temporary folders of a dead run swept, an earlier output replaced with ``--overwrite`` and
restored when the final rename fails. Last, weights that are not finite or not in range are refused before
anything is read, and a merge, unmerge or quantization that overflows its dtype fails with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli as cli
from click.testing import Result
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.artifact import files
from adapterhub_cli.artifact.files import OUTPUT_MARKER, is_earlier_output
from adapterhub_cli.errors import InvalidAdapterError, UsageError


WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------------------------------- helpers


def cli_error(result: Result) -> str:
    """Check the CLI failed cleanly (exit 2, one ``Error:`` line, no traceback); the message, unwrapped. A usage
    error (an output path that may not be used, bad weights) comes after click's usage line."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in err
    if err.startswith("Usage: "):
        err = err.split("\n\n", 1)[1]
    lines = err.splitlines()
    assert lines[0].startswith("Error: ") and sum("Error:" in line for line in lines) == 1, err
    return " ".join(err.split("\n  hint:")[0].split("\n  (set ADAPTERS_DEBUG")[0].removeprefix("Error: ").split())


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones and folders included), with the sha256 of each file's bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else p.suffix
    return out


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@dataclass
class Inputs:
    """Every input of the writers, each written by this tool (so each counts as an earlier output)."""

    root: Path
    lora: Path
    rslora: Path
    base: Path
    merged: Path
    merged_fp16: Path
    quantized: Path
    registry: Path

    @property
    def ref(self) -> str:
        return f"file://{self.registry}/acme/lora@1.0.0"


@pytest.fixture(scope="module")
def ins(llama_base: Path, llama_lora: Path, llama_rslora: Path, tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_CACHE", str(root.parent / "hash-cache"))
        mp.setenv("ADAPTERS_LOAD_PLUGINS", "")
        lora = ah.convert(llama_lora, root / "lora", to="peft").path
        rslora = ah.convert(llama_rslora, root / "rslora", to="peft").path
        base = ah.merge(llama_lora, base=llama_base, out=root / "base", weights=[0.0]).path  # llama_base's values
        merged = ah.merge(lora, base=base, out=root / "merged").path
        merged_fp16 = ah.merge(lora, base=base, out=root / "merged-fp16", dtype="fp16").path
        quantized = ah.quantize(lora, root / "quantized", scheme="int8").path
        registry = root / "registry"
        registry.mkdir()
        ah.push(lora, f"file://{registry}/acme/lora", version="1.0.0")
        (registry / OUTPUT_MARKER).touch()  # looks like an earlier output too: only the input check protects it
    return Inputs(root, lora, rslora, base, merged, merged_fp16, quantized, registry)


@pytest.fixture
def scratch(ins: Inputs, tmp_path: Path) -> Iterator[Path]:
    """A folder for outputs; on exit, every input is checked to be byte for byte what it was."""
    before = snapshot(ins.root)
    yield tmp_path
    assert snapshot(ins.root) == before


# ----------------------------------------------------------------------------------------------- the writers


@dataclass(frozen=True)
class Writer:
    """One writing command: its inputs by role, its argv and its API call for an output path."""

    name: str
    inputs: dict[str, str]  # what each input is called in a refusal -> its attribute of Inputs
    argv: Callable[[Inputs, str], list[str]]
    call: Callable[[Inputs, Path, bool], object]
    suffix: str = ""  # what an output's name ends with (a kohya file: .safetensors)


WRITERS = [
    Writer(
        "reduce",
        {"adapter": "lora"},
        lambda i, o: ["reduce", str(i.lora), "--rank", "2", "-o", o],
        lambda i, o, ow: ah.reduce(i.lora, o, rank=2, overwrite=ow),
    ),
    Writer(
        "combine",
        {"adapter": "rslora"},
        lambda i, o: ["combine", str(i.lora), str(i.rslora), "-o", o],
        lambda i, o, ow: ah.combine([i.lora, i.rslora], o, overwrite=ow),
    ),
    Writer(
        "quantize",
        {"adapter": "lora"},
        lambda i, o: ["quantize", str(i.lora), "--to", "int8", "-o", o],
        lambda i, o, ow: ah.quantize(i.lora, o, scheme="int8", overwrite=ow),
    ),
    Writer(
        "dequantize",
        {"adapter": "quantized"},
        lambda i, o: ["dequantize", str(i.quantized), "-o", o],
        lambda i, o, ow: ah.dequantize(i.quantized, o, overwrite=ow),
    ),
    Writer(
        "merge",
        {"base folder": "base", "adapter": "lora"},
        lambda i, o: ["merge", str(i.lora), "--into", str(i.base), "-o", o],
        lambda i, o, ow: ah.merge(i.lora, base=i.base, out=o, overwrite=ow),
    ),
    Writer(
        "unmerge",
        {"merged folder": "merged", "adapter": "lora"},
        lambda i, o: ["unmerge", str(i.lora), "--from", str(i.merged), "-o", o],
        lambda i, o, ow: ah.unmerge(i.lora, merged=i.merged, out=o, overwrite=ow),
    ),
    Writer(
        "convert-peft",
        {"adapter": "lora"},
        lambda i, o: ["convert", str(i.lora), "--to", "peft", "-o", o],
        lambda i, o, ow: ah.convert(i.lora, o, to="peft", overwrite=ow),
    ),
    Writer(
        "convert-kohya",
        {"adapter": "lora", "base folder": "base"},
        lambda i, o: ["convert", str(i.lora), "--to", "kohya", "--base", str(i.base), "-o", o],
        lambda i, o, ow: ah.convert(i.lora, o, to="kohya", base=i.base, overwrite=ow),
        suffix=".safetensors",
    ),
    Writer(
        "pull",
        {"local registry": "registry"},
        lambda i, o: ["pull", i.ref, "-o", o],
        lambda i, o, ow: ah.pull(i.ref, out=o, overwrite=ow),
    ),
]
#: each writer with each of its inputs, as (writer, role)
AIMED = [pytest.param(w, role, id=f"{w.name}-{role.replace(' ', '_')}") for w in WRITERS for role in w.inputs]
BY_NAME = [pytest.param(w, id=w.name) for w in WRITERS]


def _aimed_input(writer: Writer, ins: Inputs, role: str) -> tuple[str, Path]:
    return role, getattr(ins, writer.inputs[role])


def _refused(writer: Writer, ins: Inputs, out: str | Path, overwrite: bool, phrase: str) -> None:
    """The CLI and the API both refuse ``out`` with a message holding ``phrase``, and write nothing."""
    argv = writer.argv(ins, str(out)) + (["--overwrite"] if overwrite else [])
    assert phrase in cli_error(cli(*argv))
    with pytest.raises(UsageError, match=re.escape(phrase)):
        writer.call(ins, Path(out), overwrite)


# ------------------------------------------------------------------------------------ outputs that are inputs


@pytest.mark.parametrize(("writer", "role"), AIMED)
def test_output_is_an_input(ins, scratch, writer, role):
    what, given = _aimed_input(writer, ins, role)
    assert is_earlier_output(given)  # --overwrite alone would replace it
    _refused(writer, ins, given, True, f"is the {what} {given}: inputs are never modified")
    _refused(writer, ins, f"{given}/../{given.name}", True, f"is the {what} {given}: inputs are never modified")


@pytest.mark.parametrize(("writer", "role"), AIMED)
def test_output_inside_an_input_folder(ins, scratch, writer, role):
    what, given = _aimed_input(writer, ins, role)
    _refused(writer, ins, given / ("sub" + writer.suffix), False, f"is inside the {what} {given}")
    _refused(writer, ins, given / "sub" / ("deeper" + writer.suffix), True, f"is inside the {what} {given}")


@pytest.mark.parametrize(("writer", "role"), AIMED)
def test_output_containing_an_input(ins, scratch, writer, role):
    _, given = _aimed_input(writer, ins, role)
    _refused(writer, ins, given.parent, True, "contains the")
    (ins.root / OUTPUT_MARKER).touch()  # even a folder that looks like an earlier output
    try:
        _refused(writer, ins, given.parent, True, "contains the")
    finally:
        (ins.root / OUTPUT_MARKER).unlink()


@pytest.mark.parametrize(("writer", "role"), AIMED)
def test_output_is_a_symlink(ins, scratch, writer, role):
    _, given = _aimed_input(writer, ins, role)
    link = scratch / ("link" + writer.suffix)
    link.symlink_to(given)
    _refused(writer, ins, link, True, "is a symbolic link")
    dangling = scratch / ("dangling" + writer.suffix)
    dangling.symlink_to(scratch / "nowhere")
    _refused(writer, ins, dangling, False, "is a symbolic link")
    assert sorted(p.name for p in scratch.iterdir()) == sorted([link.name, dangling.name])
    assert not (scratch / "nowhere").exists()


# ------------------------------------------------------------------------------------ existing outputs


@pytest.mark.parametrize("writer", BY_NAME)
def test_existing_output_needs_overwrite_and_must_be_ours(ins, scratch, writer):
    mine = scratch / ("mine" + writer.suffix)
    if writer.suffix:  # a safetensors file some other tool wrote (no adapterhub metadata)
        save_file({"x": torch.zeros(2)}, str(mine), metadata={"format": "pt"})
    else:
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
    before = snapshot(scratch)

    result = cli(*writer.argv(ins, str(mine)))
    assert "already exists" in cli_error(result) and "--overwrite" in result.stderr
    with pytest.raises(FileExistsError):
        writer.call(ins, mine, False)
    _refused(writer, ins, mine, True, "was not written by adapters")
    assert snapshot(scratch) == before


def test_output_cannot_be_the_current_folder_or_the_root(ins, scratch, monkeypatch):
    writer = WRITERS[0]
    here = scratch / "here"
    here.mkdir()
    (here / OUTPUT_MARKER).touch()  # even an earlier output: it is where the user stands
    monkeypatch.chdir(here)
    _refused(writer, ins, ".", True, "is (or contains) the current folder")
    _refused(writer, ins, scratch, True, "is (or contains) the current folder")
    _refused(writer, ins, "/", True, "not a path an output can be written to")
    assert sorted(p.name for p in here.iterdir()) == [OUTPUT_MARKER]


@pytest.mark.parametrize("writer", BY_NAME)
def test_a_name_longer_than_the_file_system_allows(ins, scratch, writer):
    out = scratch / ("n" * (256 - len(writer.suffix)) + writer.suffix)
    _refused(writer, ins, out, False, "the name is longer than the file system allows (255 bytes)")
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------------------------ writing for real


def _stale_temporaries(parent: Path) -> dict[str, Path]:
    """What a run killed mid-write leaves beside its output (dead pid), and a live run's folder."""
    pid = dead_pid()
    made = {
        "incomplete": parent / f".half.{pid}.0a1b2c3d.incomplete",  # deleted
        "replaced": parent / f".gone.{pid}.0a1b2c3d.replaced",  # moved back: "gone" is missing
        "superseded": parent / f".there.{pid}.0a1b2c3d.replaced",  # deleted: "there" holds its replacement
        "live": parent / f".busy.{os.getpid()}.0a1b2c3d.incomplete",  # a live process's: kept
    }
    for path in made.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    (parent / "there").mkdir()
    return made


@pytest.mark.parametrize("writer", BY_NAME)
def test_each_writer_writes_a_long_relative_name_with_the_umask_and_sweeps(ins, scratch, writer, monkeypatch):
    stale = _stale_temporaries(scratch)
    name = "o" * (255 - len(writer.suffix)) + writer.suffix  # the longest name the file system allows
    monkeypatch.chdir(scratch)
    old = os.umask(0o027)
    try:
        result = cli(*writer.argv(ins, name))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    out = scratch / name
    assert is_earlier_output(out)
    written = [out, *out.rglob("*")]
    assert all(p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640) for p in written), [
        (p.name, oct(p.stat().st_mode)) for p in written
    ]
    # the dead run's temporary folder is gone, the output it had moved aside is back, the live one's is kept
    assert not stale["incomplete"].exists() and not stale["superseded"].exists() and stale["live"].exists()
    assert (scratch / "gone" / "model.safetensors").read_bytes() == b"x"
    assert sorted(p.name for p in scratch.iterdir()) == sorted(["gone", "there", stale["live"].name, name])

    # an earlier output: --overwrite replaces it (API, absolute path), nothing else is left beside it
    if out.is_dir():
        (out / "stray.txt").write_text("x")
    writer.call(ins, out, True)
    assert is_earlier_output(out) and not (out / "stray.txt").exists()
    assert sorted(p.name for p in scratch.iterdir()) == sorted(["gone", "there", stale["live"].name, name])


@pytest.mark.parametrize("writer", BY_NAME)
def test_a_failed_final_rename_restores_the_previous_output(ins, scratch, writer, monkeypatch):
    out = scratch / ("out" + writer.suffix)
    writer.call(ins, out, False)
    previous = snapshot(scratch)
    rename = files._rename

    def failing(src: Path, dst: Path) -> None:
        if src.name.endswith(".incomplete") and dst == out:
            raise OSError(28, "No space left on device", str(dst))
        rename(src, dst)

    monkeypatch.setattr(files, "_rename", failing)
    assert "No space left on device" in cli_error(cli(*writer.argv(ins, str(out)), "--overwrite"))
    with pytest.raises(OSError, match="No space left"):
        writer.call(ins, out, True)
    assert snapshot(scratch) == previous  # the previous output as it was, no temporary or moved-aside folder


@pytest.mark.parametrize("writer", BY_NAME)
def test_an_interrupt_between_the_two_renames_puts_the_previous_output_back(ins, scratch, writer, monkeypatch):
    """With --overwrite the previous output is moved aside, then the new one moved in; a Ctrl-C (or SIGTERM) that
    lands right after the first rename still leaves the previous output in place and nothing else behind."""
    out = scratch / ("out" + writer.suffix)
    writer.call(ins, out, False)
    previous = snapshot(scratch)
    rename = files._rename

    def interrupted_after(src: Path, dst: Path) -> None:
        rename(src, dst)
        if dst.name.endswith(".replaced"):
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "_rename", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        writer.call(ins, out, True)
    assert snapshot(scratch) == previous


@pytest.mark.parametrize("writer", BY_NAME)
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_every_output_file_is_on_disk_before_the_rename(ins, scratch, writer, monkeypatch):
    """Each file of an output (and its folder) is fsynced before the output is renamed into place: after a power
    loss the name cannot come back with empty files behind it."""
    out = scratch / ("out" + writer.suffix)
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, files._rename

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", str(Path(f"/proc/self/fd/{fd}").readlink())))
        fsync(fd)

    def spy_rename(src: Path, dst: Path) -> None:
        events.append(("rename", str(src)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(files, "_rename", spy_rename)
    writer.call(ins, out, False)
    moved = [i for i, (kind, path) in enumerate(events) if kind == "rename" and path.endswith(".incomplete")]
    assert len(moved) == 1
    tmp = events[moved[0]][1]
    synced = {path for kind, path in events[: moved[0]] if kind == "fsync"}
    written = [out] if out.is_file() else [out, *out.rglob("*")]
    for path in written:
        assert tmp + str(path)[len(str(out)) :] in synced, path.relative_to(scratch)


# ------------------------------------------------------------------------------------------ non-finite


WEIGHTED = {
    "combine": (
        lambda i, w, o: ["combine", str(i.lora), str(i.rslora), "--weights", w, "-o", o],
        lambda i, w, o: ah.combine([i.lora, i.rslora], o, weights=w),
    ),
    "merge": (
        lambda i, w, o: ["merge", str(i.lora), str(i.rslora), "--into", str(i.base), "--weights", w, "-o", o],
        lambda i, w, o: ah.merge([i.lora, i.rslora], base=i.base, out=o, weights=w),
    ),
    "unmerge": (
        lambda i, w, o: ["unmerge", str(i.lora), str(i.rslora), "--from", str(i.merged), "--weights", w, "-o", o],
        lambda i, w, o: ah.unmerge([i.lora, i.rslora], merged=i.merged, out=o, weights=w),
    ),
}


@pytest.mark.parametrize("command", list(WEIGHTED))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e7", "-1000000.5"])
def test_weights_must_be_finite_and_in_range(ins, scratch, command, bad):
    argv, call = WEIGHTED[command]
    assert "is not a finite number within ±1e+06" in cli_error(cli(*argv(ins, f"1,{bad}", str(scratch / "out"))))
    with pytest.raises(UsageError, match="is not a finite number within"):
        call(ins, [1.0, float(bad)], scratch / "out")
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("command", list(WEIGHTED))
def test_zero_and_the_largest_weights_are_accepted(ins, scratch, command):
    argv, call = WEIGHTED[command]
    result = cli(*argv(ins, "0,0", str(scratch / "zero")))
    assert result.exit_code == 0, result.output
    call(ins, [1e6, -1e6], scratch / "largest")
    if command != "combine":  # a zero-weight merge (unmerge) gives its input back, bit for bit
        source = ins.base if command == "merge" else ins.merged
        zero, expected = (
            load_file(str(scratch / "zero" / "model.safetensors")),
            load_file(str(source / "model.safetensors")),
        )
        assert zero.keys() == expected.keys() and all(torch.equal(zero[k], expected[k]) for k in expected)


def _overflowing(ins: Inputs, scratch: Path) -> dict[str, tuple[list[str], Callable[[Path], object]]]:
    """Requests whose arithmetic leaves float16's range (|x| > 65504) with finite, in-range inputs."""
    huge = ah.convert(ins.lora, scratch / "huge-lora", to="peft").path
    tensors = load_file(str(huge / WEIGHTS))
    for key in [k for k in tensors if "lora_B" in k][:1]:
        tensors[key] = tensors[key] * 1e6  # finite in float32, beyond float16
    save_file(tensors, str(huge / WEIGHTS), metadata={"format": "pt"})
    hot_base = ah.convert(ins.lora, scratch / "unused", to="peft").path  # (a folder to copy the base over)
    shutil.rmtree(hot_base)
    shutil.copytree(ins.base, hot_base)
    weights = load_file(str(hot_base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1e6  # untouched by the adapter, converted
    save_file(weights, str(hot_base / "model.safetensors"), metadata={"format": "pt"})
    base, lora, merged16 = str(ins.base), str(ins.lora), str(ins.merged_fp16)
    return {
        "merge-weight": (
            ["merge", lora, "--into", base, "--dtype", "fp16", "--weights", "1e6"],
            lambda o: ah.merge(ins.lora, base=ins.base, out=o, dtype="fp16", weights=[1e6]),
        ),
        "merge-huge-factor": (
            ["merge", str(huge), "--into", base, "--dtype", "fp16"],
            lambda o: ah.merge(huge, base=ins.base, out=o, dtype="fp16"),
        ),
        "merge-converted-only": (
            ["merge", lora, "--into", str(hot_base), "--dtype", "fp16"],
            lambda o: ah.merge(ins.lora, base=hot_base, out=o, dtype="fp16"),
        ),
        "unmerge-weight": (
            ["unmerge", lora, "--from", merged16, "--weights", "1e6"],
            lambda o: ah.unmerge(ins.lora, merged=ins.merged_fp16, out=o, weights=[1e6]),
        ),
        "quantize-fp16": (
            ["quantize", str(huge), "--to", "fp16"],
            lambda o: ah.quantize(huge, o, scheme="fp16"),
        ),
    }


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("merge-weight", "holds NaN or inf after the updates of"),
        ("merge-huge-factor", "holds NaN or inf after the updates of"),
        ("merge-converted-only", "tensor model.norm.weight holds NaN or inf after conversion to F16"),
        ("unmerge-weight", "holds NaN or inf after the updates of"),
        ("quantize-fp16", "fp16 cannot hold tensor"),
    ],
)
def test_an_overflow_is_refused_with_nothing_written(ins, scratch, case, phrase):
    argv, call = _overflowing(ins, scratch)[case]
    made = snapshot(scratch)
    out = scratch / "out"
    assert phrase in cli_error(cli(*argv, "-o", out))
    with pytest.raises(InvalidAdapterError, match=re.escape(phrase)):
        call(out)
    assert snapshot(scratch) == made  # no output, no temporary folder, the inputs as they were


@pytest.mark.parametrize("to", ["peft", "kohya", "diffusers"])
def test_convert_never_writes_nan(ins, scratch, to):
    """The converters keep the factors' bytes: a NaN in the input is refused by the one safetensors writer, even
    when the reader let it through (a LyCORIS / kohya file read without validation)."""
    bad = ah.convert(ins.lora, scratch / "bad", to="peft").path
    tensors = load_file(str(bad / WEIGHTS))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / WEIGHTS), metadata={"format": "pt"})
    made = snapshot(scratch)
    out = scratch / ("out.safetensors" if to == "kohya" else "out")
    result = cli("convert", bad, "--to", to, "-o", out)
    assert "NaN or inf" in cli_error(result)
    with pytest.raises(InvalidAdapterError, match="NaN or inf"):
        ah.convert(bad, out, to=to)
    assert snapshot(scratch) == made


# ------------------------------------------------------------------------------------------------ units


def test_temporary_names_of_long_targets_stay_within_the_limit(tmp_path):
    target = tmp_path / ("é" * 127)  # 254 bytes
    with files.atomic_dir(target) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        (tmp / "f").write_text("x")
    assert (target / "f").read_text() == "x" and (target / OUTPUT_MARKER).is_file()
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    assert marker["written_by"] == "adapterhub-cli"


def test_pull_never_writes_into_the_hub_cache(scratch):
    """A Hub ref's input is the huggingface_hub cache its files are fetched into: refused before any request."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    before = snapshot(cache)
    for out in (cache / "models--org--lora", cache.parent):
        message = cli_error(cli("pull", "org/lora@v1.0.0", "-o", out))
        assert "the Hugging Face cache" in message and "inputs are never modified" in message
        with pytest.raises(UsageError, match="the Hugging Face cache"):
            ah.pull("org/lora@v1.0.0", out=out)
    assert snapshot(cache) == before
