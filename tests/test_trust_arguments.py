"""Numeric options of the operations, from the Python API and the command line: a wrong type or a value out of
range is a ``UsageError`` naming the option (exit 2 from the CLI), never a ``TypeError``, a traceback or a
10 GB allocation; what the factor math refuses for one module is an ``InvalidAdapterError`` naming the input
and the module."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_error, run_cli
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.errors import InvalidAdapterError, UsageError


WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda a, o: ah.reduce(a, o, rank=2.5), "--rank 2.5: give a whole number >= 1"),
        (lambda a, o: ah.reduce(a, o, rank="2"), "--rank '2': give a whole number"),
        (lambda a, o: ah.reduce(a, o, rank=True), "--rank True: give a whole number"),
        (lambda a, o: ah.reduce(a, o, energy="0.9"), "--energy '0.9': give a finite number"),
        (lambda a, o: ah.reduce(a, o, energy=float("nan")), "--energy nan: give a finite number"),
        (lambda a, o: ah.reduce(a, o, energy=0.9, max_rank=1.5), "--max-rank 1.5: give a whole number"),
        (lambda a, o: ah.quantize(a, o, scheme="int8", block_size="64"), "--block-size '64': give a whole number"),
        (lambda a, o: ah.quantize(a, o, scheme="int8", block_size=1 << 40), "give a whole number from 1 to 65536"),
        (lambda a, o: ah.quantize(a, o, scheme="fp8", block_size=0), "give a whole number from 1 to 65536"),
        (lambda a, o: ah.quantize(a, o, scheme="nf4", block_size=7), "bitsandbytes' nf4 takes 32, 64, 128"),
        (lambda a, o: ah.combine([a, a], o, method="dare_linear", density=0.5, seed=1 << 63), "--seed"),
        (lambda a, o: ah.combine([a, a], o, method="dare_linear", density=0.5, seed="x"), "--seed 'x'"),
        (lambda a, o: ah.combine([a, a], o, method="dare_linear", density=0.5, seed=-1), "--seed -1"),
        (lambda a, o: ah.combine([a, a], o, method="svd", rank=1.5), "--rank 1.5"),
        (lambda a, o: ah.combine([a, a], o, method="ties", density="0.5"), "--density '0.5'"),
    ],
)
def test_api_options_of_the_wrong_type_or_range_are_usage_errors(
    llama_lora: Path, tmp_path: Path, call: Callable[[Path, Path], object], phrase: str
) -> None:
    with pytest.raises(UsageError, match=None) as info:
        call(llama_lora, tmp_path / "out")
    assert phrase in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["combine", "{a}", "{a}", "--method", "dare_linear", "--density", "0.5", "--seed", str(1 << 70)],
        ["quantize", "{a}", "--to", "int8", "--block-size", str(1 << 40)],
        ["quantize", "{a}", "--to", "nf4", "--block-size", "7"],
    ],
    ids=["huge-seed", "huge-block", "nf4-block"],
)
def test_cli_options_out_of_range_exit_2_cleanly(llama_lora: Path, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "out"
    result = run_cli(*(a.format(a=llama_lora) for a in args), "-o", out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "ADAPTERS_DEBUG" not in result.output and not out.exists()


def _rewrite(folder: Path, change: Callable[[str, torch.Tensor], torch.Tensor], **config: object) -> None:
    tensors = {k: change(k, v) for k, v in load_file(folder / WEIGHTS).items()}
    save_file(tensors, folder / WEIGHTS)
    if config:
        cfg = json.loads((folder / CONFIG).read_text())
        cfg.update(config)
        (folder / CONFIG).write_text(json.dumps(cfg))


def test_a_negative_alpha_is_reduced_like_any_other_and_a_zero_one_is_refused_by_module(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """PEFT takes a negative lora_alpha (the update subtracts); reduce keeps it and gives the optimal rank-k update
    of the negated adapter. An alpha of 0 (an update of zero everywhere) cannot be given a rank: refused, naming
    the adapter and the module."""
    d = copy_adapter(llama_lora, "negative-alpha")
    _rewrite(d, lambda k, v: v, lora_alpha=-16)
    out = ah.reduce(d, tmp_path / "out", rank=4).path
    src, red = ah.load(d), ah.load(out)
    assert red.config.lora_alpha == -16
    for name in src.modules:
        f, g = src.factors(name), red.factors(name)
        dense = (f.scale * (f.B.double() @ f.A.double())).cpu()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        got = g.scale * (g.B.double() @ g.A.double())
        assert g.scale < 0 and torch.allclose(got, best, rtol=1e-4, atol=1e-6 * float(s[0])), name

    z = copy_adapter(llama_lora, "zero-alpha")
    _rewrite(z, lambda k, v: v, lora_alpha=0)
    with pytest.raises(InvalidAdapterError) as info:
        ah.reduce(z, tmp_path / "zero", rank=4)
    assert str(z) in str(info.value) and "module model.layers." in str(info.value) and info.value.hint
    result = run_cli("reduce", z, "--rank", "4", "-o", tmp_path / "zero")
    assert_one_error(result)
    assert "ADAPTERS_DEBUG" not in result.output and not (tmp_path / "zero").exists()


def test_extreme_finite_factors_fail_cleanly_in_every_combine_method(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """Float64 factors near 1e300 are finite, but their update is not: each method refuses the module by name."""
    d = copy_adapter(llama_lora, "extreme")
    _rewrite(d, lambda k, v: v.double() * 1e299 if "lora_" in k else v)
    for method in ("ties", "dare_ties", "magnitude_prune", "svd"):
        out = tmp_path / method
        extra = ["--density", "0.5"] if method != "svd" else []
        result = run_cli("combine", d, d, "--method", method, *extra, "-o", out)
        assert_one_error(result)
        assert "ADAPTERS_DEBUG" not in result.output and not out.exists(), (method, result.output)


def test_extreme_finite_factors_fail_cleanly_in_diff_and_the_spectrum(
    llama_lora: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora, "extreme-diff")
    _rewrite(d, lambda k, v: v.double() * 1e299 if "lora_" in k else v)
    for args in (["diff", d, llama_lora], ["inspect", d, "--spectrum"]):
        result = run_cli(*args)
        assert_one_error(result)
        assert f"{d}" in result.stderr and "module model.layers." in result.stderr, result.stderr
        assert "ADAPTERS_DEBUG" not in result.output


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune", "svd"])
def test_a_negative_alpha_combines_like_the_same_update_with_b_negated(
    llama_lora: Path, llama_rslora: Path, copy_adapter: Callable[..., Path], tmp_path: Path, method: str
) -> None:
    """alpha -16 with B is the update of alpha 16 with -B: every method gives the same combined update for both
    (the first input's alpha, negative or not, is the output's)."""
    neg = copy_adapter(llama_lora, f"neg-{method}")
    _rewrite(neg, lambda k, v: v, lora_alpha=-16)
    flipped = copy_adapter(llama_lora, f"flipped-{method}")
    _rewrite(flipped, lambda k, v: -v if "lora_B" in k else v)
    extra = {"density": 0.5} if method != "svd" else {}
    seeded = {"seed": 3} if method.startswith("dare") else {}
    a = ah.load(ah.combine([neg, llama_rslora], tmp_path / "a", method=method, **extra, **seeded).path)
    b = ah.load(ah.combine([flipped, llama_rslora], tmp_path / "b", method=method, **extra, **seeded).path)
    assert a.config.lora_alpha == -16 and b.config.lora_alpha == 16
    for name in a.modules:
        fa, fb = a.factors(name), b.factors(name)
        da, db = fa.scale * (fa.B.double() @ fa.A.double()), fb.scale * (fb.B.double() @ fb.A.double())
        assert torch.isfinite(da).all() and torch.allclose(da, db, rtol=1e-4, atol=1e-7 * float(db.abs().max())), name


@pytest.mark.parametrize(("dtype", "size"), [(torch.float64, 1e299), (torch.bfloat16, 1e37)], ids=["f64", "bf16"])
def test_validate_refuses_finite_factors_whose_update_overflows(
    llama_lora: Path,
    llama_base: Path,
    copy_adapter: Callable[..., Path],
    tmp_path: Path,
    dtype: torch.dtype,
    size: float,
) -> None:
    """Every factor is finite, but scale * B @ A is not (PEFT computes it in float32): an error finding in validate,
    and reduce (which would carry the overflow into its output: its SVD runs in float64) refuses it by module."""
    d = copy_adapter(llama_lora, f"overflow-{dtype}")
    _rewrite(d, lambda k, v: (v.double() / v.double().abs().max() * size).to(dtype) if "lora_" in k else v)
    report = ah.validate(d, base=llama_base)
    assert not report.ok and {f.code for f in report.errors} == {"update-overflow"}
    assert len(report.errors) == len(ah.load(d).modules)
    result = run_cli("validate", d, "--base", llama_base)
    assert result.exit_code == 1 and "update-overflow" in result.output
    result = run_cli("reduce", d, "--rank", "2", "-o", tmp_path / "out")
    assert_one_error(result)
    assert "beyond float32's range" in " ".join(result.stderr.split()) and not (tmp_path / "out").exists()


def test_convert_and_dequantize_refuse_an_update_that_overflows_too(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """The operations that write the factors as they are (convert, dequantize) give the update-overflow refusal
    validate gives, before writing: finite factors, too large for each other (as PEFT computes the update)."""
    from safetensors import safe_open

    d = copy_adapter(llama_lora, "overflow-convert")
    _rewrite(d, lambda k, v: (v.double() / v.double().abs().max() * 1e299) if "lora_" in k else v)
    quantized = Path(ah.quantize(llama_lora, tmp_path / "q", scheme="int8").path)
    (weights,) = quantized.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # the block scales of int8 made huge: every dequantized factor is finite (~1e20), their product is not
    save_file({k: v * 1e22 if v.dtype == torch.float32 else v for k, v in tensors.items()}, weights, metadata=metadata)
    for folder in (d, quantized):
        assert {f.code for f in ah.validate(folder, base=llama_base).errors} == {"update-overflow"}, folder
    for args, out in (
        (["convert", d, "--to", "kohya", "-o", tmp_path / "k.safetensors"], tmp_path / "k.safetensors"),
        (["dequantize", quantized, "-o", tmp_path / "dq"], tmp_path / "dq"),
    ):
        result = run_cli(*args)
        assert_one_error(result)
        assert "update-overflow" in result.stderr and "beyond float32's range" in " ".join(result.stderr.split())
        assert not out.exists()


def test_the_overflow_check_reads_8_bit_float_factors(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """Factors stored as float8 (torch on CPU takes no max of them) are measured as float32: convert goes through
    and the update it writes is the one the fp8 factors give."""
    d = copy_adapter(llama_lora, "fp8-factors")
    _rewrite(d, lambda k, v: v.to(torch.float8_e4m3fn) if "lora_" in k else v)
    result = run_cli("convert", d, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 0, result.output
    src, out = ah.load(d), ah.load(tmp_path / "k.safetensors")
    for name in src.modules:
        f, g = src.factors(name), out.factors(name)
        want = f.scale * (f.B.double() @ f.A.double())
        torch.testing.assert_close(g.scale * (g.B.double() @ g.A.double()), want, rtol=1e-6, atol=0)
