"""Trust: dtypes torch cannot compute in, factor shapes PEFT refuses, and safetensors files the library refuses.

- 8-bit float factors (F8_E4M3, F8_E5M2) load as float32, exactly, as PEFT loads them into its float32 LoRA
  layers: every command runs on them, and a NaN or inf among them is still caught (validate: exit 1; the
  others: exit 2, nothing written). An 8-bit float *base* weight cannot take an update: merge and unmerge refuse
  it as they refuse an integer one.
- Factors of a Linear / embedding LoRA are 2-D and of a Conv2d LoRA 4-D (lora_B [d_out, r, 1, 1]); a 3-D lora_A
  (in the file or through quantization metadata) is a ``factor-shape`` error for validate and refused by every
  other command, never read as a Linear with its trailing dimensions multiplied.
- A safetensors header must cover the data exactly (tensors back to back from byte 0 to the end of the file) and
  name no tensor (nor an entry's field) twice, as the safetensors library requires.

Each CLI case checks: the exit status, one ``Error:`` line and no traceback, nothing written, the inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_error, run_cli
from click.testing import Result
from peft_helpers import peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.artifact.adapter import LoraModule, factor_shape_problem
from adapterhub_cli.artifact.safetensors import (
    TensorInfo,
    all_finite,
    count_nonfinite,
    parse_header,
    read_header,
    save_safetensors,
)
from adapterhub_cli.errors import CorruptFileError, IncompatibleBaseError, InvalidAdapterError
from lora_ops import LoraOpsError, merge_lora, unmerge_delta


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"
A0 = f"base_model.model.{Q0}.lora_A.weight"
B0 = f"base_model.model.{Q0}.lora_B.weight"
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "hash-cache"))


# ------------------------------------------------------------------------------------------------- helpers


def digest(*paths: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``paths``."""
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def refused(args: list[object], inputs: list[Path], out: Path | None = None, exit_code: int = 2) -> str:
    """Run ``adapters ARGS``: it fails cleanly (one ``Error:`` line, no traceback), writes nothing and leaves
    ``inputs`` unchanged; the error message, unwrapped."""
    before = digest(*inputs)
    result = run_cli(*args)
    assert_one_error(result, exit_code)
    assert out is None or not out.exists()
    assert digest(*inputs) == before
    return " ".join(result.stderr.split())


def succeeded(args: list[object], inputs: list[Path]) -> Result:
    before = digest(*inputs)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Error:" not in result.output
    assert digest(*inputs) == before
    return result


def rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    """Rewrite ``folder``'s weights (with the safetensors library) as ``change`` returns them; config kept."""
    weights = folder / WEIGHTS
    tensors = change(load_file(weights))
    save_file({k: v.contiguous() for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    return folder


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception:  # the library's SafetensorError and friends
        return False
    return True


def layout(entries: dict[str, tuple[str, list[int], list[int]]]) -> dict[str, dict[str, object]]:
    return {k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()}


def st_file(path: Path, header: Mapping[str, object] | str, data: bytes) -> Path:
    """A safetensors file from a header (a dict, or its JSON text as written) and the data section."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --------------------------------------------------------------------------------------- 8-bit float factors


@pytest.fixture(params=FP8, ids=["e4m3", "e5m2"])
def fp8_lora(request: pytest.FixtureRequest, llama_lora: Path, copy_adapter: Callable[..., Path]) -> Path:
    """``llama_lora`` with every factor stored as an 8-bit float (config unchanged)."""
    dtype = request.param
    return rewrite(copy_adapter(llama_lora, f"fp8-{dtype}"), lambda t: {k: v.to(dtype) for k, v in t.items()})


def test_fp8_factors_load_as_float32_as_peft_loads_them(fp8_lora: Path, llama_base: Path) -> None:
    stored = load_file(fp8_lora / WEIGHTS)
    assert stored[A0].dtype in FP8
    adapter = ah.load(fp8_lora)
    f = adapter.factors(Q0, finite=True)
    assert f.A.dtype == f.B.dtype == torch.float32
    assert torch.equal(f.A, stored[A0].float()) and torch.equal(f.B, stored[B0].float())
    assert adapter.source.load([A0])[A0].dtype == torch.float32
    # PEFT loads the same adapter into float32 layers holding the same numbers
    params = dict(peft_model(llama_base, fp8_lora).named_parameters())
    loaded = params[A0.replace(".weight", ".default.weight")]
    assert loaded.dtype == torch.float32 and torch.equal(loaded.detach(), stored[A0].float())


def test_fp8_adapter_runs_through_every_command(
    fp8_lora: Path, llama_base: Path, llama_lora: Path, tmp_path: Path
) -> None:
    inputs = [fp8_lora, llama_base]
    result = succeeded(["validate", fp8_lora, "--base", llama_base], inputs)
    assert "OK" in result.stdout
    succeeded(["inspect", fp8_lora, "--spectrum"], inputs)
    succeeded(["diff", fp8_lora, llama_lora], inputs)
    succeeded(["analyze", fp8_lora, "--base", llama_base], inputs)
    outputs = {
        "reduce": ["reduce", fp8_lora, "--rank", "4"],
        "combine": ["combine", fp8_lora, llama_lora],
        "quantize": ["quantize", fp8_lora, "--to", "int8"],
        "gguf.gguf": ["convert", fp8_lora, "--to", "gguf", "--base", llama_base],
        "peft": ["convert", fp8_lora, "--to", "peft"],
    }
    for name, args in outputs.items():
        out = tmp_path / name
        succeeded([*args, "-o", out], inputs)
        assert out.exists()
        if out.is_dir():
            assert all(all_finite(t) for t in load_file(out / WEIGHTS).values())
            assert library_accepts(out / WEIGHTS)
    # what reduce wrote loads in PEFT
    peft_model(llama_base, tmp_path / "reduce")


def test_fp8_adapter_merges_as_its_float32_upcast(
    fp8_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    upcast = rewrite(copy_adapter(fp8_lora, "upcast"), lambda t: {k: v.float() for k, v in t.items()})
    succeeded(["merge", fp8_lora, "--into", llama_base, "-o", tmp_path / "m8"], [fp8_lora, llama_base])
    succeeded(["merge", upcast, "--into", llama_base, "-o", tmp_path / "m32"], [upcast, llama_base])
    m8, m32 = load_file(tmp_path / "m8" / "model.safetensors"), load_file(tmp_path / "m32" / "model.safetensors")
    assert m8.keys() == m32.keys() and all(torch.equal(m8[k], m32[k]) for k in m8)


@pytest.mark.parametrize(
    ("dtype", "value", "counts"),
    [
        (torch.float8_e4m3fn, float("nan"), (64, 0)),
        (torch.float8_e5m2, float("nan"), (64, 0)),
        (torch.float8_e5m2, float("inf"), (0, 64)),
    ],
    ids=["e4m3-nan", "e5m2-nan", "e5m2-inf"],
)
def test_fp8_nan_and_inf_are_still_caught(
    dtype: torch.dtype,
    value: float,
    counts: tuple[int, int],
    llama_lora: Path,
    llama_base: Path,
    copy_adapter: Callable[..., Path],
    tmp_path: Path,
) -> None:
    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(dtype) for k, v in t.items()}
        out[A0] = t[A0].index_fill(1, torch.tensor([0]), value).to(dtype)  # column 0: one value in each of 8 rows
        return out

    bad = rewrite(copy_adapter(llama_lora, "fp8-bad"), poison)
    stored = load_file(bad / WEIGHTS)[A0]
    assert stored.dtype == dtype and not all_finite(stored)
    assert count_nonfinite(stored) == tuple(c // 8 for c in counts)

    inputs = [bad, llama_base, llama_lora]
    before = digest(*inputs)
    result = run_cli("validate", bad, "--base", llama_base, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (finding,) = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "non-finite"]
    assert finding["module"] == A0
    assert digest(*inputs) == before

    for name, args in {
        "reduce": ["reduce", bad, "--rank", "4"],
        "combine": ["combine", bad, llama_lora],
        "quantize": ["quantize", bad, "--to", "int8"],
        "gguf.gguf": ["convert", bad, "--to", "gguf", "--base", llama_base],
        "peft": ["convert", bad, "--to", "peft"],
        "merged": ["merge", bad, "--into", llama_base],
    }.items():
        out = tmp_path / name
        message = refused([*args, "-o", out], inputs, out)
        assert "NaN or inf" in message or "non-finite" in message, message
    for args in (["diff", bad, llama_lora], ["inspect", bad, "--spectrum"], ["analyze", bad, "--base", llama_base]):
        assert "NaN or inf" in refused(args, inputs)


# ------------------------------------------------------------------------------------ 8-bit float base weights


@pytest.fixture(params=FP8, ids=["e4m3", "e5m2"])
def fp8_base(request: pytest.FixtureRequest, llama_base: Path, copy_adapter: Callable[..., Path]) -> Path:
    """``llama_base`` whose layer-0 q_proj weight is stored as an 8-bit float."""
    d = copy_adapter(llama_base, f"fp8-base-{request.param}")
    tensors = load_file(d / "model.safetensors")
    tensors[f"{Q0}.weight"] = tensors[f"{Q0}.weight"].to(request.param)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_fp8_base_weight_is_refused_by_merge_and_unmerge(fp8_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    report = ah.validate(llama_lora, base=fp8_base)
    (finding,) = [f for f in report.errors if f.code == "base-weight-not-float"]
    assert finding.module == Q0 and "F8_E" in finding.message
    inputs = [fp8_base, llama_lora]
    message = refused(["merge", llama_lora, "--into", fp8_base, "-o", tmp_path / "m"], inputs, tmp_path / "m")
    assert "base-weight-not-float" in message and f"{Q0}.weight" in message
    # the "merged" checkpoint holding an 8-bit float weight: unmerge refuses it as it refuses an int8 one
    message = refused(["unmerge", llama_lora, "--from", fp8_base, "-o", tmp_path / "u"], inputs, tmp_path / "u")
    assert "base-weight-not-float" in message and "F8_E" in message
    with pytest.raises(IncompatibleBaseError, match="base-weight-not-float"):
        ah.unmerge(llama_lora, merged=fp8_base, out=tmp_path / "u2")
    assert not (tmp_path / "u2").exists()


def test_fp8_base_weight_is_refused_with_a_quantization_config(
    fp8_base: Path, llama_lora: Path, tmp_path: Path
) -> None:
    """An fp8-quantized checkpoint (quant_method fp8) is no bitsandbytes one: its weights still take no update."""
    config = json.loads((fp8_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (fp8_base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m"
    message = refused(["merge", llama_lora, "--into", fp8_base, "-o", out], [fp8_base, llama_lora], out)
    assert "base-weight-not-float" in message and "ADAPTERS_DEBUG" not in message


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_lora_ops_refuses_an_fp8_weight(dtype: torch.dtype) -> None:
    weight = torch.zeros(4, 3).to(dtype)
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    for subtract in (False, True):
        with pytest.raises(LoraOpsError, match="8-bit float"):
            merge_lora(weight, a, b, 0.5, subtract=subtract)
    with pytest.raises(LoraOpsError, match="8-bit float"):
        unmerge_delta(weight, torch.ones(4, 3))


# ------------------------------------------------------------------------------------------- factor shapes


@pytest.fixture
def a3d(llama_lora: Path, copy_adapter: Callable[..., Path]) -> Path:
    """``llama_lora`` whose layer-0 q_proj lora_A [8, 64] is stored reshaped as [8, 8, 8]."""
    return rewrite(copy_adapter(llama_lora, "a3d"), lambda t: {**t, A0: t[A0].reshape(8, 8, 8)})


def test_3d_lora_a_is_a_validate_error_and_peft_refuses_it(a3d: Path, llama_base: Path) -> None:
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_model(llama_base, a3d)
    before = digest(a3d, llama_base)
    result = run_cli("validate", a3d, "--base", llama_base, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (finding,) = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "factor-shape"]
    assert finding["severity"] == "error" and finding["module"] == Q0
    assert A0 in finding["message"] and "[8, 8, 8]" in finding["message"]
    assert digest(a3d, llama_base) == before


def test_3d_lora_a_is_refused_by_every_other_command(
    a3d: Path, llama_base: Path, llama_lora: Path, tmp_path: Path
) -> None:
    inputs = [a3d, llama_base, llama_lora]
    for name, args in {
        "reduce": ["reduce", a3d, "--rank", "4"],
        "combine": ["combine", a3d, llama_lora],
        "quantize": ["quantize", a3d, "--to", "int8"],
        "peft": ["convert", a3d, "--to", "peft"],
        "gguf.gguf": ["convert", a3d, "--to", "gguf", "--base", llama_base],
        "merged": ["merge", a3d, "--into", llama_base],
    }.items():
        out = tmp_path / name
        message = refused([*args, "-o", out], inputs, out)
        assert A0 in message and "[8, 8, 8]" in message, message
    for args in (["diff", a3d, llama_lora], ["inspect", a3d, "--spectrum"], ["analyze", a3d, "--base", llama_base]):
        message = refused(args, inputs)
        assert A0 in message and "[8, 8, 8]" in message, message
    with pytest.raises(InvalidAdapterError, match=r"\[8, 8, 8\]"):
        ah.load(a3d).factors(Q0)


def test_3d_lora_a_through_quantization_metadata_is_refused(
    llama_lora: Path, llama_base: Path, tmp_path: Path
) -> None:
    q = tmp_path / "int8"
    ah.quantize(llama_lora, q, scheme="int8", block_size=64)
    weights = q / WEIGHTS
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["adapterhub.quantization"])
    assert meta["tensors"][A0]["shape"] == [8, 64]
    meta["tensors"][A0]["shape"] = [8, 8, 8]
    header["__metadata__"]["adapterhub.quantization"] = json.dumps(meta)
    st_file(weights, header, raw[8 + n :])

    inputs = [q, llama_base]
    before = digest(*inputs)
    result = run_cli("validate", q, "--base", llama_base, "--json")
    assert result.exit_code == 1 and "factor-shape" in {f["code"] for f in json.loads(result.stdout)["findings"]}
    assert digest(*inputs) == before
    out = tmp_path / "dq"
    message = refused(["dequantize", q, "-o", out], inputs, out)
    assert "factor-shape" in message and "[8, 8, 8]" in message


def _module(kind: str, a: tuple[int, ...], b: tuple[int, ...]) -> LoraModule:
    def info(name: str, shape: tuple[int, ...]) -> TensorInfo:
        return TensorInfo(name, "F32", shape, 0, 0)

    return LoraModule("m", kind, a[0], b[0], 1, 8.0, 1.0, info("m.lora_A.weight", a), info("m.lora_B.weight", b))


@pytest.mark.parametrize(
    ("kind", "a", "b", "ok"),
    [
        ("linear", (8, 64), (64, 8), True),
        ("embedding", (8, 128), (64, 8), True),
        ("conv", (8, 4, 3, 3), (16, 8, 1, 1), True),
        ("linear", (8, 8, 8), (64, 8), False),
        ("linear", (8, 64), (64, 8, 1), False),
        ("linear", (8, 4, 3), (16, 8, 1), False),  # a Conv1d LoRA: not supported here
        ("linear", (8, 4, 3, 3, 3), (16, 8, 1, 1, 1), False),  # a Conv3d LoRA
        ("embedding", (8, 4, 4), (64, 8), False),
        ("conv", (8, 4, 3, 3), (16, 8), False),
        ("conv", (8, 4, 3, 3), (16, 8, 3, 3), False),
    ],
)
def test_factor_shape_rule(kind: str, a: tuple[int, ...], b: tuple[int, ...], ok: bool) -> None:
    problem = factor_shape_problem(_module(kind, a, b))
    assert (problem is None) == ok, problem
    if not ok:
        assert problem is not None and ("lora_A" in problem or "lora_B" in problem)


# ---------------------------------------------------------------------------------- safetensors coverage


def _peft_weights(llama_lora: Path) -> tuple[dict[str, object], bytes]:
    raw = (llama_lora / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _shifted(header: dict[str, object], by: int, after: int = -1) -> dict[str, object]:
    """``header`` with the offsets of every tensor starting after byte ``after`` moved by ``by``."""
    out: dict[str, object] = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict) and v["data_offsets"][0] > after:
            v = {**v, "data_offsets": [o + by for o in v["data_offsets"]]}
        out[k] = v
    return out


def _damage(kind: str, header: dict[str, object], data: bytes) -> tuple[dict[str, object] | str, bytes]:
    first = min((v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: o[0])  # type: ignore[index]
    if kind == "trailing":
        return header, data + bytes(64)
    if kind == "leading":
        return _shifted(header, 16), bytes(16) + data
    if kind == "between":
        return _shifted(header, 16, after=first[0]), data[: first[1]] + bytes(16) + data[first[1] :]
    if kind == "duplicate-name":  # a second A0 entry pointing at extra bytes: the last one would win
        text = json.dumps(header)[:-1]
        extra = {"dtype": "F32", "shape": [8, 64], "data_offsets": [len(data), len(data) + 2048]}
        return f"{text}, {json.dumps(A0)}: {json.dumps(extra)}}}", data + bytes(2048)
    if kind == "duplicate-field":
        text = json.dumps(header)
        entry = json.dumps(header[A0])
        return text.replace(entry, entry[:-1] + ', "dtype": "F32"}', 1), data
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("trailing", "64 bytes follow the last tensor"),
        ("leading", "bytes 0..16 belong to no tensor"),
        ("between", "belong to no tensor"),
        ("duplicate-name", f"names {A0!r} twice"),
        ("duplicate-field", "names 'dtype' twice"),
    ],
)
def test_files_the_library_refuses_are_refused(
    kind: str, said: str, llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    bad = copy_adapter(llama_lora, f"bad-{kind}")
    header, data = _damage(kind, *_peft_weights(llama_lora))
    st_file(bad / WEIGHTS, header, data)
    assert not library_accepts(bad / WEIGHTS)
    with pytest.raises(CorruptFileError, match="safetensors library refuses") as e:
        read_header(bad / WEIGHTS)
    assert said in str(e.value) and str(bad / WEIGHTS) in str(e.value)

    inputs = [bad, llama_base]
    for args in (["validate", bad, "--base", llama_base], ["inspect", bad]):
        assert said in refused(args, inputs)
    out = tmp_path / "r"
    assert said in refused(["reduce", bad, "--rank", "4", "-o", out], inputs, out)


@pytest.mark.parametrize(
    ("entries", "data", "ok"),
    [
        ({"a": ("U8", [2], [0, 2]), "b": ("U8", [0], [2, 2])}, 2, True),  # an empty tensor at the end
        ({"a": ("U8", [0], [0, 0]), "b": ("U8", [2], [0, 2])}, 2, True),  # ... at the start
        ({"a": ("U8", [0], [1, 1]), "b": ("U8", [2], [0, 2])}, 2, False),  # ... inside another
        ({"a": ("U8", [0], [5, 5]), "b": ("U8", [2], [0, 2])}, 2, False),  # ... past the end
        ({"a": ("U8", [2], [2, 4]), "b": ("U8", [2], [0, 2])}, 4, True),  # out of name order
        ({"a": ("U8", [2], [0, 2])}, 3, False),  # one byte more
        ({"a": ("U8", [1], [1, 2])}, 2, False),  # the first byte unused
        ({"a": ("F4", [4], [0, 2])}, 2, True),
        ({"a": ("F4", [3], [0, 2])}, 2, False),  # 12 bits: not whole bytes
        ({}, 0, True),
        ({}, 1, False),
    ],
)
def test_reader_agrees_with_the_library(
    entries: dict[str, tuple[str, list[int], list[int]]], data: int, ok: bool, tmp_path: Path
) -> None:
    path = st_file(tmp_path / "x.safetensors", layout(entries), bytes(data))
    assert library_accepts(path) == ok
    if ok:
        assert set(read_header(path).tensors) == set(entries)
    else:
        with pytest.raises(CorruptFileError):
            read_header(path)


def test_files_written_by_this_tool_the_library_and_peft_read(llama_lora: Path, tmp_path: Path) -> None:
    tensors = {"w": torch.ones(3, 5), "h": torch.zeros(7, dtype=torch.float16), "e": torch.zeros(0, 4)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(tensors, ours, {"format": "pt"})
    save_file(tensors, theirs, metadata={"format": "pt"})
    for path in (ours, theirs, llama_lora / WEIGHTS):
        assert library_accepts(path)
        assert read_header(path).tensors


def test_a_file_of_unknown_size_is_not_refused_for_its_end(llama_lora: Path) -> None:
    """A store that does not list a file's size passes ``sys.maxsize``: the tensors must still lie back to back,
    but where the file ends is not known."""
    raw = (llama_lora / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = parse_header(raw[8 : 8 + n], path=llama_lora / WEIGHTS, file_size=sys.maxsize)
    assert A0 in header.tensors
    with pytest.raises(CorruptFileError, match="64 bytes follow"):
        parse_header(raw[8 : 8 + n], path=llama_lora / WEIGHTS, file_size=len(raw) + 64)
