"""`quantize` / `dequantize`: size and error, read transparently by other operations, PEFT loads the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft.utils import set_peft_model_state_dict
from peft_helpers import dense_delta, logits, lora_layers, peft_model
from safetensors.torch import load_file

import adapterhub_cli as ah
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.formats.quantized import QUANT_KEY, SCALE_SUFFIX


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what ``quantize --to`` stores the factors as
STORED = {"int8": "I8", "fp8": "F8_E4M3", "nf4": "U8", "bf16": "BF16", "fp16": "F16"}


def _dense(adapter: ah.Adapter, name: str) -> torch.Tensor:
    f = adapter.factors(name)
    return f.scale * (f.B.double() @ f.A.double())


@pytest.mark.parametrize(
    ("scheme", "max_error", "min_ratio"),
    [("int8", 0.01, 3.7), ("fp8", 0.05, 3.7), ("nf4", 0.2, 6.0), ("bf16", 0.005, 2.0), ("fp16", 0.001, 2.0)],
)
def test_size_and_error(scheme, max_error, min_ratio, llama_all_linear, tmp_path):
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    result = ah.quantize(llama_all_linear, tmp_path / scheme, scheme=scheme)
    assert result.ratio >= min_ratio
    assert result.max_rel_error < max_error
    original, quantized = ah.load(llama_all_linear), ah.load(result.path)
    report = ah.inspect(quantized)
    assert (report.quantization is not None) == (scheme in ("int8", "fp8", "nf4"))
    assert set(quantized.modules) == set(original.modules)
    errors = {m.name: m.rel_error for m in result.modules}
    for name in original.modules:
        assert quantized.modules[name].rank == original.modules[name].rank
        exact, approx = _dense(original, name), _dense(quantized, name)
        assert errors[name] == pytest.approx(float((approx - exact).norm() / exact.norm()), rel=1e-4, abs=1e-9)


def test_int8_on_adapter_with_saved_modules_and_dequantize_loads_in_peft(roberta_lora, roberta_base, tmp_path):
    q = ah.quantize(roberta_lora, tmp_path / "q", scheme="int8").path
    back = ah.dequantize(q, tmp_path / "back")
    quantized = ah.load(q)
    model = peft_model(roberta_base, back, task="seq-cls")
    for name, layer in lora_layers(model).items():
        if name in quantized.modules:
            torch.testing.assert_close(dense_delta(layer), _dense(quantized, name), rtol=1e-6, atol=1e-9)
    reference = peft_model(roberta_base, roberta_lora, task="seq-cls")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0.05, atol=0.05)
    assert ah.validate(q, base=roberta_base).ok


def test_operations_read_quantized_adapters_transparently(llama_lora, llama_rslora, tmp_path):
    q = ah.quantize(llama_lora, tmp_path / "q", scheme="int8").path
    deq = ah.dequantize(q, tmp_path / "deq")
    assert ah.diff(q, deq).verdict == "identical"
    a = ah.reduce(q, tmp_path / "rq", rank=2)
    b = ah.reduce(deq, tmp_path / "rd", rank=2)
    assert [m.rel_error for m in a.modules] == pytest.approx([m.rel_error for m in b.modules], rel=1e-9)
    combined = ah.combine([q, llama_rslora], tmp_path / "c", weights=[1.0, 1.0])
    assert len(combined.modules) == 8


def test_refusals(llama_lora, tmp_path):
    q = ah.quantize(llama_lora, tmp_path / "q", scheme="int8").path
    with pytest.raises(ah.UsageError, match="already quantized"):
        ah.quantize(q, tmp_path / "qq", scheme="int8")
    with pytest.raises(ah.UsageError, match="not quantized"):
        ah.dequantize(llama_lora, tmp_path / "d")
    with pytest.raises(ah.UsageError, match="unknown scheme"):
        ah.quantize(llama_lora, tmp_path / "x", scheme="int3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_cli(llama_lora, tmp_path):
    runner = CliRunner()
    cli = build_cli()
    res = runner.invoke(cli, ["quantize", str(llama_lora), "--to", "int8", "-o", str(tmp_path / "q"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["scheme"] == "int8" and data["ratio"] > 3.5 and len(data["modules"]) == 4
    res = runner.invoke(cli, ["inspect", str(tmp_path / "q")])
    assert "int8 (blocks of 64)" in res.output and "produced by" in res.output
    res = runner.invoke(cli, ["dequantize", str(tmp_path / "q"), "-o", str(tmp_path / "d")])
    assert res.exit_code == 0 and (tmp_path / "d" / "adapter_model.safetensors").is_file()
    res = runner.invoke(cli, ["quantize", str(llama_lora), "--to", "int3", "-o", str(tmp_path / "z")])
    assert res.exit_code == 2


# ------------------------------------------------------------------------------------- dequantize, by hand


def by_hand(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors a ``quantize`` output stands for, dequantized here from the stored bytes, float32: int8 / fp8
    codes times their block's scale; nf4's 4-bit codes (two per byte, high nibble first) looked up in the NF4 table
    times the block's absmax; a bf16 / fp16 cast widened."""
    raw = load_file(folder / "adapter_model.safetensors")
    meta = read_header(folder / "adapter_model.safetensors").metadata
    q = json.loads(meta[QUANT_KEY]) if QUANT_KEY in meta else {"tensors": {}, "scheme": None, "block_size": 0}
    out = {}
    for key, t in raw.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if key not in q["tensors"]:
            out[key] = t.float()
            continue
        shape, block = q["tensors"][key]["shape"], q["block_size"]
        n = math.prod(shape)
        if q["scheme"] == "nf4":
            import bitsandbytes.functional as bnb

            codes = torch.stack([t >> 4, t & 15], dim=-1).reshape(-1)[:n].long()
            values = bnb.get_4bit_type("nf4", device="cpu").float()[codes]
        else:
            values = t.float()
        scale = raw[key + SCALE_SUFFIX].float().repeat_interleave(block)[:n]
        out[key] = (values * scale).reshape(shape)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4", "bf16", "fp16"])
def test_dequantize_any_output_loads_in_peft_and_equals_the_hand_dequantized_adapter(
    scheme, dtype, llama_base, llama_all_linear, tmp_path
):
    """Every scheme `quantize` writes, casts included, comes back as a PEFT adapter in the dtype asked for; PEFT's
    forward equals the adapter dequantized by hand (set into a PEFT model directly)."""
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    q = ah.quantize(llama_all_linear, tmp_path / "q", scheme=scheme).path
    header = read_header(q / "adapter_model.safetensors")
    assert {header.tensors[k].dtype for k in header.tensors if ".lora_" in k and k.endswith(".weight")} == {
        STORED[scheme]
    }
    back = ah.dequantize(q, tmp_path / "back", dtype=dtype)
    written = read_header(back / "adapter_model.safetensors")
    assert QUANT_KEY not in written.metadata and not any(k.endswith(SCALE_SUFFIX) for k in written.tensors)
    assert {i.dtype for i in written.tensors.values()} == {{"fp32": "F32", "bf16": "BF16"}[dtype]}

    hand = {k: v.to(DTYPES[dtype]) for k, v in by_hand(q).items()}
    loaded = load_file(back / "adapter_model.safetensors")
    assert loaded.keys() == hand.keys() and all(torch.equal(loaded[k], hand[k]) for k in hand)

    theirs = peft_model(llama_base, back)
    reference = peft_model(llama_base, llama_all_linear)  # the original adapter's config, factors replaced
    result = set_peft_model_state_dict(reference, hand)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(theirs), logits(reference), rtol=0, atol=0)


def test_block_size_with_a_cast_is_a_usage_error(llama_lora, tmp_path):
    """A cast has no blocks: --block-size there would be silently ignored, so it is refused (exit 2)."""
    runner, cli = CliRunner(), build_cli()
    for scheme in ("bf16", "fp16"):
        res = runner.invoke(
            cli, ["quantize", str(llama_lora), "--to", scheme, "--block-size", "32", "-o", str(tmp_path / scheme)]
        )
        assert res.exit_code == 2 and "--block-size" in res.output, res.output
        assert not (tmp_path / scheme).exists()
    res = runner.invoke(cli, ["quantize", str(llama_lora), "--to", "bf16", "-o", str(tmp_path / "cast")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        cli, ["quantize", str(llama_lora), "--to", "int8", "--block-size", "32", "-o", str(tmp_path / "q")]
    )
    assert res.exit_code == 0, res.output
    assert "int8 (blocks of 32)" in runner.invoke(cli, ["inspect", str(tmp_path / "q")]).output
    assert "[default: 64]" in runner.invoke(cli, ["quantize", "--help"]).output


def test_dequantize_cli_dtype_and_refusals(llama_lora, tmp_path):
    runner, cli = CliRunner(), build_cli()
    q = ah.quantize(llama_lora, tmp_path / "q", scheme="fp16").path
    res = runner.invoke(cli, ["dequantize", str(q), "--dtype", "fp16", "-o", str(tmp_path / "d"), "--json"])
    assert res.exit_code == 0, res.output
    assert {i.dtype for i in read_header(tmp_path / "d" / "adapter_model.safetensors").tensors.values()} == {"F16"}
    res = runner.invoke(cli, ["dequantize", str(q), "--dtype", "int8", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--dtype" in res.output
    with pytest.raises(ah.UsageError, match="unknown dtype"):
        ah.dequantize(q, tmp_path / "y", dtype="fp64")
    reduced = ah.reduce(llama_lora, tmp_path / "r", rank=2).path  # written by this tool, but not by quantize
    with pytest.raises(ah.UsageError, match="not quantized"):
        ah.dequantize(reduced, tmp_path / "z")
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


# ------------------------------------------------------------------------------------------------ inspect


@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4", "bf16"])
def test_inspect_reports_the_stored_dtypes_and_the_scheme(scheme, llama_lora, tmp_path):
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    q = ah.quantize(llama_lora, tmp_path / "q", scheme=scheme).path
    header = read_header(q / "adapter_model.safetensors")
    expected: dict[str, int] = {}
    for info in header.tensors.values():
        expected[info.dtype] = expected.get(info.dtype, 0) + info.numel
    report = ah.inspect(q)
    assert report.dtypes == expected and STORED[scheme] in report.dtypes
    if scheme == "bf16":
        assert report.quantization is None  # a cast: PEFT loads it as it is
        return
    assert report.dtypes["F32"] == sum(i.numel for k, i in header.tensors.items() if k.endswith(SCALE_SUFFIX))
    assert report.quantization.startswith(f"{scheme} (blocks of 64)") and STORED[scheme] in report.quantization
    res = CliRunner().invoke(build_cli(), ["inspect", str(q)])
    assert res.exit_code == 0, res.output
    assert STORED[scheme] in res.output and "F32 scales" in res.output


def test_the_api_and_a_batch_job_refuse_a_block_size_with_a_cast(llama_lora, tmp_path):
    """The check lives in the operation: the API and a batch job refuse it as the CLI does (nothing written)."""
    with pytest.raises(ah.UsageError, match="--block-size applies to int8, fp8 and nf4"):
        ah.quantize(llama_lora, tmp_path / "a", scheme="bf16", block_size=32)
    job = {"op": "quantize", "source": str(llama_lora), "out": str(tmp_path / "b"), "scheme": "fp16", "block_size": 32}
    [record] = ah.batch([job], engine="serial")
    assert record.status == "failed" and record.error_code == "UsageError"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert ah.quantize(llama_lora, tmp_path / "c", scheme="int8").block_size == 64
