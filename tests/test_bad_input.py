"""Bad input: every user mistake or damaged file gets a typed error naming the file and the problem.

Each case is checked through the Python API (exact exception type, message) and through the CLI
(exit status 2, one ``Error:`` message, no traceback, nothing written, the input left untouched).
Corrupt safetensors files are crafted byte by byte (8-byte little-endian header length + JSON + data).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli as cli
from click.testing import Result
from safetensors.torch import load_file

import adapterhub_cli as ah
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.errors import (
    AdapterNotFoundError,
    CorruptFileError,
    InvalidAdapterError,
    UnknownFormatError,
    UnsafeFileError,
)


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY = "adapter_model.bin"
Q0 = "model.layers.0.self_attn.q_proj"
Q0_KEY = f"base_model.model.{Q0}"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Successful inspects cache file hashes; keep that cache out of the user's home."""
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "hash-cache"))


# ----------------------------------------------------------------------------- helpers


def st_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file from a header dict and the raw data section."""
    js = json.dumps(header).encode()
    return struct.pack("<Q", len(js)) + js + data


def st_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A well-formed safetensors file (tensors laid out back to back), written without the safetensors library."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    chunks, pos = [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return st_bytes(header, b"".join(chunks))


def q0_pair_header(a: list[int], b: list[int], a_dtype: str = "F32") -> dict:
    """Header of one LoRA pair (q_proj of layer 0, r=8, 64 -> 64: 2048 bytes each in F32)."""
    return {
        f"{Q0_KEY}.lora_A.weight": {"dtype": a_dtype, "shape": [8, 64], "data_offsets": a},
        f"{Q0_KEY}.lora_B.weight": {"dtype": "F32", "shape": [64, 8], "data_offsets": b},
    }


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def cli_error(result: Result, exit_code: int = 2) -> str:
    """Check the CLI failed cleanly; return the error message (the line after ``Error:``, unwrapped).

    Bad input is one ``Error:`` message and its hint; a usage error (options that contradict each other) comes
    after click's usage line. Neither is a bug, so neither carries the ``ADAPTERS_DEBUG`` traceback hint."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    err = result.stderr
    assert "Traceback" not in err
    if err.startswith("Usage: "):
        usage, err = err.split("\n\n", 1)
        assert "Try '" in usage, usage
    lines = err.splitlines()
    assert lines[0].startswith("Error: "), err
    assert sum("Error:" in line for line in lines) == 1, err
    assert "ADAPTERS_DEBUG" not in err
    body = err.split("\n  hint:")[0]
    return " ".join(body.removeprefix("Error: ").split())


def set_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


# ------------------------------------------------------------------ table of bad inputs


@dataclass
class Case:
    path: Path  # what the user passes
    exc: type[Exception]  # the exact exception type
    file: Path  # the file the message must name
    parts: list[str]  # what the message must say
    module: str | None = None


Maker = Callable[[Path, Callable[..., Path], Path], Case]


def _missing(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    p = tmp / "no-such-adapter"
    return Case(p, AdapterNotFoundError, p, ["adapter not found"])


def _no_config(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    (d / CONFIG).unlink()
    return Case(d, InvalidAdapterError, d, [f"no {CONFIG} in this folder"])


def _empty_folder(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = tmp / "empty"
    d.mkdir()
    return Case(d, InvalidAdapterError, d, [f"no {CONFIG} in this folder"])


def _no_weights(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    (d / WEIGHTS).unlink()
    return Case(d, InvalidAdapterError, d, [f"no {WEIGHTS} in this folder"])


def _config_not_json(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    (d / CONFIG).write_text('{"r": 8, "lora_alpha": ')
    return Case(d, CorruptFileError, d / CONFIG, [f"{CONFIG} is not valid JSON"])


def _config_not_object(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    (d / CONFIG).write_text("[8, 16]")
    return Case(d, CorruptFileError, d / CONFIG, [f"{CONFIG} must hold a JSON object"])


def _config_not_lora(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    set_config(d, peft_type="PREFIX_TUNING")
    return Case(d, InvalidAdapterError, d, ["peft_type is 'PREFIX_TUNING'", "only LoRA adapters"])


def _config_bad_rank(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    set_config(d, r=0)
    return Case(d, InvalidAdapterError, d, ["r must be a positive integer, got 0"])


def _cut_data(src: Path, dest: Path, keep_data: int) -> tuple[str, str]:
    """Copy ``src`` to ``dest`` keeping ``keep_data`` bytes of the data section; return (tensor, message)."""
    header = read_header(src)
    dest.write_bytes(src.read_bytes()[: 8 + header.header_size + keep_data])
    first_cut = min((t for t in header.tensors.values() if t.end > keep_data), key=lambda t: t.start)
    return first_cut.name, (
        f"tensor {first_cut.name!r}: bytes {first_cut.start}..{first_cut.end} lie past the end of the data "
        f"({keep_data} bytes): the file is truncated"
    )


def _truncated_data(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    size = read_header(w)
    keep = size.file_size - 8 - size.header_size - 100
    name, message = _cut_data(src / WEIGHTS, w, keep)
    assert name.endswith("layers.1.self_attn.v_proj.lora_B.weight")  # the last tensor is cut
    return Case(d, CorruptFileError, w, [message], module=name)


def _truncated_in_header(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    n = header_length(w)
    w.write_bytes(w.read_bytes()[: 8 + n // 2])
    return Case(d, CorruptFileError, w, [f"header length {n} is larger than the file ({8 + n // 2} bytes)"])


def _truncated_in_length(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    w.write_bytes(w.read_bytes()[:5])
    return Case(d, CorruptFileError, w, ["truncated safetensors file (5 bytes, no header)"])


def _header_length_too_large(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    data = w.read_bytes()
    w.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    return Case(d, CorruptFileError, w, [f"header length {1 << 40} is larger than the file ({len(data)} bytes)"])


def _header_not_json(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    js = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # the closing brace is missing
    w.write_bytes(struct.pack("<Q", len(js)) + js + bytes(4))
    return Case(d, CorruptFileError, w, ["header is not valid JSON"])


def _header_not_utf8(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    js = b"\xff\xfe\x00garbage"
    w.write_bytes(struct.pack("<Q", len(js)) + js)
    return Case(d, CorruptFileError, w, ["header is not valid JSON"])


def _offsets_out_of_range(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    w.write_bytes(st_bytes(q0_pair_header([0, 2048], [2048, 4096]), bytes(3000)))
    key = f"{Q0_KEY}.lora_B.weight"
    return Case(
        d, CorruptFileError, w, [f"tensor {key!r}: bytes 2048..4096 lie past the end of the data (3000 bytes)"], key
    )


def _overlapping_offsets(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    w.write_bytes(st_bytes(q0_pair_header([0, 2048], [1024, 3072]), bytes(3072)))
    a, b = f"{Q0_KEY}.lora_A.weight", f"{Q0_KEY}.lora_B.weight"
    return Case(d, CorruptFileError, w, [f"tensors {a!r} and {b!r} overlap in the file"], b)


def _unknown_dtype(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    w = d / WEIGHTS
    w.write_bytes(st_bytes(q0_pair_header([0, 2048], [2048, 4096], a_dtype="F128"), bytes(4096)))
    key = f"{Q0_KEY}.lora_A.weight"
    return Case(d, CorruptFileError, w, [f"tensor {key!r}: unknown dtype 'F128'"], key)


def _a_without_b(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    tensors = load_file(d / WEIGHTS)
    del tensors[f"{Q0_KEY}.lora_B.weight"]
    (d / WEIGHTS).write_bytes(st_from_tensors(tensors))
    return Case(d, InvalidAdapterError, d, [f"module {Q0!r} has lora_A but no lora_B"], Q0)


def _b_without_a(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    tensors = load_file(d / WEIGHTS)
    del tensors[f"{Q0_KEY}.lora_A.weight"]
    (d / WEIGHTS).write_bytes(st_from_tensors(tensors))
    return Case(d, InvalidAdapterError, d, [f"module {Q0!r} has lora_B but no lora_A"], Q0)


def _rank_disagrees(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    d = copy(src)
    set_config(d, r=4)
    return Case(d, InvalidAdapterError, d, [f"{CONFIG} says rank 4 for {Q0} but its tensors have rank 8"], Q0)


def _bare_file_truncated(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    f = tmp / "lonely.safetensors"
    name, message = _cut_data(src / WEIGHTS, f, 3000)
    return Case(f, CorruptFileError, f, [message], module=name)


def _not_an_adapter(src: Path, copy: Callable[..., Path], tmp: Path) -> Case:
    f = tmp / "notes.txt"
    f.write_text("hello")
    return Case(f, UnknownFormatError, f, ["no format can read"])


CASES: dict[str, Maker] = {
    "missing-path": _missing,
    "no-config": _no_config,
    "empty-folder": _empty_folder,
    "no-weights": _no_weights,
    "config-not-json": _config_not_json,
    "config-not-object": _config_not_object,
    "config-not-lora": _config_not_lora,
    "config-bad-rank": _config_bad_rank,
    "truncated-in-data": _truncated_data,
    "truncated-in-header": _truncated_in_header,
    "truncated-in-length": _truncated_in_length,
    "header-length-too-large": _header_length_too_large,
    "header-not-json": _header_not_json,
    "header-not-utf8": _header_not_utf8,
    "offsets-out-of-range": _offsets_out_of_range,
    "overlapping-offsets": _overlapping_offsets,
    "unknown-dtype": _unknown_dtype,
    "lora-a-without-b": _a_without_b,
    "lora-b-without-a": _b_without_a,
    "rank-disagrees-with-tensors": _rank_disagrees,
    "bare-file-truncated": _bare_file_truncated,
    "not-an-adapter": _not_an_adapter,
}


@pytest.fixture(params=list(CASES))
def bad(request: pytest.FixtureRequest, llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path) -> Case:
    work = tmp_path / "work"
    work.mkdir()
    return CASES[request.param](llama_lora, copy_adapter, work)


def test_bad_input_api(bad: Case) -> None:
    with pytest.raises(Exception) as exc:
        ah.load(bad.path)
    assert type(exc.value) is bad.exc, repr(exc.value)
    assert isinstance(exc.value, ah.AdaptersError)
    message = str(exc.value)
    assert str(bad.file) in message
    for part in bad.parts:
        assert part in message
    if isinstance(exc.value, InvalidAdapterError):
        assert exc.value.path == bad.file
        assert exc.value.module == bad.module
    # inspect reads the same way
    with pytest.raises(bad.exc) as again:
        ah.inspect(bad.path)
    assert str(again.value) == message


def test_bad_input_api_validate(bad: Case, llama_base: Path) -> None:
    if bad.exc is InvalidAdapterError and "says rank" in bad.parts[0]:
        pytest.skip("validate reports a rank disagreement as a finding (tested below)")
    with pytest.raises(bad.exc) as exc:
        ah.validate(bad.path, base=llama_base)
    assert type(exc.value) is bad.exc
    assert str(bad.file) in str(exc.value)


@pytest.mark.parametrize("command", ["inspect", "inspect-json", "validate"])
def test_bad_input_cli(bad: Case, command: str, llama_base: Path) -> None:
    rank_case = bad.exc is InvalidAdapterError and "says rank" in bad.parts[0]
    if command == "validate" and rank_case:
        pytest.skip("validate reports a rank disagreement as a finding (tested below)")
    watched = bad.path.parent
    before_tree, before_list = tree_digest(bad.path), listing(watched)
    args = {
        "inspect": ["inspect", str(bad.path)],
        "inspect-json": ["inspect", str(bad.path), "--json"],
        "validate": ["validate", str(bad.path), "--base", str(llama_base)],
    }[command]
    message = cli_error(cli(*args), exit_code=2)
    assert str(bad.file) in message
    for part in bad.parts:
        assert part in message
    assert tree_digest(bad.path) == before_tree
    assert listing(watched) == before_list


# ---------------------------------------------------------------------- config from a newer PEFT


def test_config_with_unknown_keys_is_accepted_with_a_warning(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, shiny_new_option=True, another_future_key={"x": 1})
    adapter = ah.load(d)
    assert len(adapter.modules) == 4
    assert adapter.config.unknown_keys == ["another_future_key", "shiny_new_option"]
    assert adapter.warnings == [
        "config keys unknown to this PEFT version (written by a newer PEFT?), ignored: "
        "another_future_key, shiny_new_option"
    ]
    assert ah.inspect(d).warnings == adapter.warnings

    result = cli("inspect", str(d))
    assert result.exit_code == 0, result.output
    assert "warning: config keys unknown to this PEFT version" in result.stderr
    assert "shiny_new_option" in result.stderr
    assert "Error" not in result.stderr

    result = cli("inspect", str(d), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["warnings"] == adapter.warnings

    report = ah.validate(d, base=llama_base)
    assert report.ok
    assert [(f.code, f.severity) for f in report.findings] == [("adapter-warning", "warning")]
    assert "shiny_new_option" in report.findings[0].message
    assert cli("validate", str(d), "--base", str(llama_base)).exit_code == 0


# ------------------------------------------------------------------- rank disagreement, NaN, misfits


def test_rank_mismatch_validate_reports_and_exits_1(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, r=4)
    before = tree_digest(d)
    report = ah.validate(d, base=llama_base)
    assert not report.ok
    ranks = [f for f in report.findings if f.code == "rank-mismatch"]
    assert [f.module for f in ranks] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert all(f.severity == "error" for f in ranks)
    assert "the tensors have rank 8 but the config (r) says 4" in ranks[0].message
    assert report.errors == ranks

    result = cli("validate", str(d), "--base", str(llama_base), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert {f["code"] for f in doc["findings"] if f["severity"] == "error"} == {"rank-mismatch"}

    result = cli("validate", str(d), "--base", str(llama_base))
    assert result.exit_code == 1
    assert "rank-mismatch" in result.stdout
    assert "4 error(s)" in result.stdout
    assert "Traceback" not in result.output
    assert tree_digest(d) == before


def test_rank_pattern_mismatch_names_rank_pattern(
    llama_patterns: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_patterns)
    set_config(d, rank_pattern={"v_proj": 4, "model.layers.1.self_attn.q_proj": 3})
    with pytest.raises(InvalidAdapterError) as exc:
        ah.load(d)
    assert exc.value.module == "model.layers.1.self_attn.q_proj"
    assert "says rank 3 for model.layers.1.self_attn.q_proj but its tensors have rank 2" in str(exc.value)
    (finding,) = [f for f in ah.validate(d, base=llama_base).findings if f.code == "rank-mismatch"]
    assert finding.module == "model.layers.1.self_attn.q_proj"
    assert "rank 2 but the config (rank_pattern) says 3" in finding.message


def test_non_finite_tensors(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_lora)
    tensors = load_file(d / WEIGHTS)
    a_key, b_key = f"{Q0_KEY}.lora_A.weight", "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[a_key][0, 0] = float("nan")
    tensors[a_key][1, 3] = float("nan")
    tensors[b_key][5, 2] = float("inf")
    tensors[b_key][6, 2] = float("-inf")
    tensors[b_key][7, 2] = float("nan")
    (d / WEIGHTS).write_bytes(st_from_tensors(tensors))
    before = tree_digest(d)

    ah.load(d)  # headers are fine: loading does not read the weights
    report = ah.validate(d, base=llama_base)
    assert not report.ok
    bad = {f.module: f.message for f in report.findings if f.code == "non-finite"}
    assert set(bad) == {a_key, b_key}
    assert "holds 2 NaN and 0 inf values" in bad[a_key]
    assert "holds 1 NaN and 2 inf values" in bad[b_key]
    assert all(f.severity == "error" for f in report.findings if f.code == "non-finite")

    skipped = ah.validate(d, base=llama_base, check_weights=False)
    assert skipped.ok
    assert not [f for f in skipped.findings if f.code == "non-finite"]

    result = cli("validate", str(d), "--base", str(llama_base))
    assert result.exit_code == 1
    assert "non-finite" in result.stdout
    assert cli("validate", str(d), "--base", str(llama_base), "--no-weights").exit_code == 0
    assert cli("inspect", str(d)).exit_code == 0  # inspect reads headers only
    assert tree_digest(d) == before


def test_adapter_for_a_wider_base(llama_lora_wide: Path, llama_base: Path) -> None:
    before = tree_digest(llama_lora_wide)
    report = ah.validate(llama_lora_wide, base=llama_base)
    assert not report.ok
    shape = [f for f in report.findings if f.code == "shape-mismatch"]
    assert [f.module for f in shape] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert report.errors == shape
    assert "lora_A [8, 96] / lora_B [96, 8] do not fit the base weight [64, 64]" in shape[0].message
    assert "lora_A [8, 96] / lora_B [48, 8] do not fit the base weight [32, 64]" in shape[1].message
    result = cli("validate", str(llama_lora_wide), "--base", str(llama_base), "--json")
    assert result.exit_code == 1
    assert [f["code"] for f in json.loads(result.stdout)["findings"] if f["severity"] == "error"] == [
        "shape-mismatch"
    ] * 4
    assert tree_digest(llama_lora_wide) == before


def test_target_module_the_base_lacks(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    """PEFT needs only one target_modules entry to match (multi-architecture lists are common): an entry that
    matches nothing is a note, not an error; nothing matching at all is what PEFT refuses."""
    d = copy_adapter(llama_lora)
    set_config(d, target_modules=["q_proj", "v_proj", "nonexistent_proj"])
    ah.load(d)  # loads: the config is well-formed
    report = ah.validate(d, base=llama_base)
    assert report.ok
    notes = [(f.code, f.severity, f.module) for f in report.findings if f.code == "target-unused"]
    assert notes == [("target-unused", "info", "nonexistent_proj")]
    result = cli("validate", str(d), "--base", str(llama_base))
    assert result.exit_code == 0 and "target-unused" in result.stdout
    set_config(d, target_modules=["nonexistent_proj"])
    report = ah.validate(d, base=llama_base)
    assert "targets-not-found" in [f.code for f in report.errors]
    assert cli("validate", str(d), "--base", str(llama_base)).exit_code == 1


# --------------------------------------------------------------------------------- bad bases


def test_validate_with_missing_base(llama_lora: Path, tmp_path: Path) -> None:
    base = tmp_path / "no-such-base"
    with pytest.raises(AdapterNotFoundError):
        ah.validate(llama_lora, base=base)
    message = cli_error(cli("validate", str(llama_lora), "--base", str(base)))
    assert message == f"base model not found: {base}"
    assert not base.exists()


def test_validate_with_base_without_weights(llama_lora: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with pytest.raises(InvalidAdapterError) as exc:
        ah.validate(llama_lora, base=base)
    assert type(exc.value) is InvalidAdapterError
    message = cli_error(cli("validate", str(llama_lora), "--base", str(base)))
    assert message == f"{base}: no model.safetensors or model.safetensors.index.json here"
    assert listing(base) == ["config.json"]


def test_validate_with_sharded_base_missing_a_shard(
    llama_lora: Path, llama_base_sharded: Path, copy_adapter: Callable[..., Path]
) -> None:
    base = copy_adapter(llama_base_sharded)
    shard = sorted(base.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CorruptFileError) as exc:
        ah.validate(llama_lora, base=base)
    assert exc.value.path == base / "model.safetensors.index.json"
    message = cli_error(cli("validate", str(llama_lora), "--base", str(base)))
    assert f"the index names {shard.name}, which is missing" in message


def test_validate_with_truncated_base(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    base = copy_adapter(llama_base)
    w = base / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4])
    message = cli_error(cli("validate", str(llama_lora), "--base", str(base)))
    assert message.startswith(f"{w}: tensor ")
    assert "the file is truncated" in message


# ------------------------------------------------------------------------------- legacy pickle


class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def pickle_adapter(llama_lora: Path, tmp_path: Path) -> Path:
    """llama_lora with only adapter_model.bin (torch.save of its real state dict)."""
    d = tmp_path / "pickled"
    d.mkdir()
    (d / CONFIG).write_bytes((llama_lora / CONFIG).read_bytes())
    torch.save(load_file(llama_lora / WEIGHTS), d / LEGACY)
    return d


def test_legacy_pickle_loads_when_allowed(pickle_adapter: Path, llama_lora: Path, llama_base: Path) -> None:
    ref = ah.load(llama_lora)
    lora = ah.load(pickle_adapter, allow_pickle=True)
    assert lora.tensor_file is None
    assert list(lora.modules) == list(ref.modules)
    for name, m in ref.modules.items():
        got = lora.modules[name]
        assert (got.kind, got.rank, got.d_out, got.d_in, got.alpha, got.scale) == (
            m.kind,
            m.rank,
            m.d_out,
            m.d_in,
            m.alpha,
            m.scale,
        )
        assert got.A.shape == m.A.shape
        assert got.B.shape == m.B.shape
        assert got.dtype == "F32"
        f_ref, f_got = ref.factors(name), lora.factors(name)
        assert torch.equal(f_ref.A, f_got.A)
        assert torch.equal(f_ref.B, f_got.B)
        assert f_got.scale == 2.0
    assert ah.validate(lora, base=llama_base).findings == []

    result = cli("inspect", str(pickle_adapter), "--allow-pickle", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["num_modules"] == 4
    assert doc["ranks"] == [8]
    assert doc["tensor_file"] is None
    assert cli("validate", str(pickle_adapter), "--base", str(llama_base), "--allow-pickle").exit_code == 0


def test_legacy_pickle_refused_without_allow_pickle(pickle_adapter: Path, llama_base: Path) -> None:
    before = tree_digest(pickle_adapter)
    with pytest.raises(InvalidAdapterError) as exc:
        ah.load(pickle_adapter)
    assert type(exc.value) is InvalidAdapterError
    assert str(exc.value) == f"{pickle_adapter}: only a legacy pickle {LEGACY} is here"
    assert "--allow-pickle" in (exc.value.hint or "")
    for args in (["inspect", str(pickle_adapter)], ["validate", str(pickle_adapter), "--base", str(llama_base)]):
        result = cli(*args)
        assert cli_error(result) == f"{pickle_adapter}: only a legacy pickle {LEGACY} is here"
        assert "hint: pass --allow-pickle" in result.stderr
    assert tree_digest(pickle_adapter) == before


def test_bare_legacy_pickle_file(pickle_adapter: Path) -> None:
    f = pickle_adapter / LEGACY
    with pytest.raises(InvalidAdapterError) as exc:
        ah.load(f)
    assert type(exc.value) is InvalidAdapterError
    assert str(exc.value) == f"{f}: legacy pickle file"
    assert cli_error(cli("inspect", str(f))) == f"{f}: legacy pickle file"
    lora = ah.load(f, allow_pickle=True)  # the sibling adapter_config.json is used
    assert len(lora.modules) == 4
    assert lora.config.lora_alpha == 16
    assert not lora.config_inferred


def _write_payload(kind: str, target: Path, marker: Path) -> None:
    if kind == "pickle.dump":  # a plain, zip-less pickle
        with target.open("wb") as f:
            pickle.dump(_Payload(marker), f, protocol=2)
    elif kind == "torch.save":
        torch.save(_Payload(marker), target)
    elif kind == "torch.save-legacy":
        torch.save(_Payload(marker), target, _use_new_zipfile_serialization=False)
    elif kind == "hidden-in-state-dict":
        torch.save(
            {f"{Q0_KEY}.lora_A.weight": torch.zeros(8, 64), f"{Q0_KEY}.lora_B.weight": _Payload(marker)}, target
        )
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["pickle.dump", "torch.save", "torch.save-legacy", "hidden-in-state-dict"])
def test_malicious_pickle_is_refused(
    kind: str, llama_lora: Path, llama_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    (d / CONFIG).write_bytes((llama_lora / CONFIG).read_bytes())
    _write_payload(kind, d / LEGACY, marker)
    before = tree_digest(d)

    for source in (d, d / LEGACY):
        with pytest.raises(UnsafeFileError) as exc:
            ah.load(source, allow_pickle=True)
        assert type(exc.value) is UnsafeFileError
        assert exc.value.path == d / LEGACY
        assert "refused to load: the pickle needs more than tensors" in str(exc.value)
        assert not marker.exists()

    for args in (
        ["inspect", str(d), "--allow-pickle"],
        ["inspect", str(d / LEGACY), "--allow-pickle", "--json"],
        ["validate", str(d), "--base", str(llama_base), "--allow-pickle"],
    ):
        message = cli_error(cli(*args))
        assert message.startswith(f"{d / LEGACY}: refused to load")
        assert not marker.exists()
    assert tree_digest(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


def test_damaged_pickle_is_a_corrupt_file(pickle_adapter: Path) -> None:
    legacy = pickle_adapter / LEGACY
    legacy.write_bytes(b"hello, this is not a pickle")
    with pytest.raises(CorruptFileError) as exc:
        ah.load(pickle_adapter, allow_pickle=True)
    assert type(exc.value) is CorruptFileError
    assert str(exc.value).startswith(f"{legacy}: cannot read the pickle")
    assert cli_error(cli("inspect", str(pickle_adapter), "--allow-pickle")).startswith(
        f"{legacy}: cannot read the pickle"
    )
    assert legacy.read_bytes() == b"hello, this is not a pickle"


def test_truncated_zip_pickle_is_a_corrupt_file(pickle_adapter: Path, llama_base: Path) -> None:
    legacy = pickle_adapter / LEGACY
    data = legacy.read_bytes()
    legacy.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError) as exc:
        ah.load(pickle_adapter, allow_pickle=True)
    assert str(exc.value).startswith(f"{legacy}: cannot read the pickle")
    assert cli_error(cli("validate", str(pickle_adapter), "--base", str(llama_base), "--allow-pickle")).startswith(
        f"{legacy}: cannot read the pickle"
    )


def test_pickle_that_is_not_a_state_dict(pickle_adapter: Path) -> None:
    legacy = pickle_adapter / LEGACY
    torch.save([torch.zeros(2)], legacy)
    with pytest.raises(CorruptFileError) as exc:
        ah.load(pickle_adapter, allow_pickle=True)
    assert str(exc.value) == f"{legacy}: the pickle does not hold a {{name: tensor}} state dict"


# ------------------------------------------------------------------------- CLI rendering


def test_error_stays_on_one_line_after_a_warning(
    llama_lora: Path, copy_adapter: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_cli.cli import _output

    monkeypatch.setattr(_output.out, "_err", None)
    warned = copy_adapter(llama_lora)
    set_config(warned, future_key=1)
    assert "warning:" in cli("inspect", str(warned)).stderr  # creates the rich stderr console
    broken = copy_adapter(llama_lora, "a" * 60)
    w = broken / WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    first_line = cli("inspect", str(broken)).stderr.splitlines()[0]
    assert first_line.startswith("Error: ")
    assert first_line.endswith("the file is truncated")
