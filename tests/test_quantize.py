"""`quantize` / `dequantize`: size and error, read transparently by other operations, PEFT loads the result."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft_helpers import dense_delta, logits, lora_layers, peft_model

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli


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
