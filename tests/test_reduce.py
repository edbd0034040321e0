"""`reduce`: the optimal (Eckart-Young) error from factors, PEFT loads the output and computes the reduced update."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from click.testing import CliRunner
from peft_helpers import dense_delta, logits, lora_layers, peft_model
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli


CASES = [
    ("llama_lora", "llama_base"),
    ("llama_rslora", "llama_base"),
    ("llama_patterns", "llama_base"),
    ("llama_dora", "llama_base"),
    ("gpt2_lora", "gpt2_base"),
]


def _dense_optimum(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The dense truncated SVD of ``delta`` (float64) and its relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    return best, float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def _folder_hash(path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(("adapter_name", "base_name"), CASES)
def test_reduce_reaches_the_dense_optimum_and_peft_computes_it(adapter_name, base_name, request, tmp_path):
    adapter_dir = request.getfixturevalue(adapter_name)
    base_dir = request.getfixturevalue(base_name)
    before = _folder_hash(adapter_dir)
    result = ah.reduce(adapter_dir, tmp_path / "out", rank=2)
    assert _folder_hash(adapter_dir) == before  # the input is never modified

    reference = peft_model(base_dir, adapter_dir)
    reduced = peft_model(base_dir, result.path)
    ref_layers, red_layers = lora_layers(reference), lora_layers(reduced)
    assert set(ref_layers) == set(red_layers) == {m.name for m in result.modules}
    rows = {m.name: m for m in result.modules}
    with torch.no_grad():
        for name, layer in ref_layers.items():
            delta = dense_delta(layer)
            k = min(2, layer.r["default"])
            best, optimum = _dense_optimum(delta, k)
            assert rows[name].rank_after == k == red_layers[name].r["default"]
            assert rows[name].rel_error == pytest.approx(optimum, rel=1e-9, abs=1e-12)
            got = dense_delta(red_layers[name])
            # stored in fp32: the reduced update equals the dense truncated SVD to fp32 rounding
            assert torch.linalg.norm(got - best) <= 1e-5 * torch.linalg.norm(delta)
            assert rows[name].retained_energy == pytest.approx(1 - optimum**2, abs=1e-9)
            # put the dense optimum into the reference model (rank r, zero-padded) for the forward check
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            scale = layer.scaling["default"]
            b = torch.zeros_like(layer.lora_B["default"].weight)
            a = torch.zeros_like(layer.lora_A["default"].weight)
            b[:, :k] = (u[:, :k] * s[:k] / scale).float()
            a[:k] = vh[:k].float()
            layer.lora_B["default"].weight.copy_(b)
            layer.lora_A["default"].weight.copy_(a)
    torch.testing.assert_close(logits(reduced), logits(reference), rtol=1e-5, atol=1e-5)


def test_scales_follow_the_rank_rule(llama_rslora, llama_patterns, llama_base, tmp_path):
    for src, name in ((llama_rslora, "rs"), (llama_patterns, "pat")):
        out = ah.reduce(src, tmp_path / name, rank=2).path
        cfg = json.loads((out / "adapter_config.json").read_text())
        model = peft_model(llama_base, out)
        for mod, layer in lora_layers(model).items():
            alpha = layer.lora_alpha["default"]
            want = alpha / math.sqrt(2) if cfg["use_rslora"] else alpha / 2
            assert layer.scaling["default"] == pytest.approx(want), mod


def test_dynamic_modes_write_rank_pattern_that_peft_applies(llama_all_linear, llama_base, tmp_path):
    result = ah.reduce(llama_all_linear, tmp_path / "energy", energy=0.8)
    ranks = {m.name: m.rank_after for m in result.modules}
    assert len(set(ranks.values())) > 1 or result.rank_pattern == {}
    assert all(m.retained_energy >= 0.8 - 1e-12 for m in result.modules)
    model = peft_model(llama_base, result.path)
    assert {n: layer.r["default"] for n, layer in lora_layers(model).items()} == ranks
    adapter = ah.load(llama_all_linear)
    for name in ranks:  # the smallest k reaching the energy
        s = torch.linalg.svdvals(ah.load(llama_all_linear).factors(name).B.double() @ adapter.factors(name).A.double())
        e = (s**2).cumsum(0) / (s**2).sum()
        assert ranks[name] == int((e < 0.8 - 1e-12).sum()) + 1


def test_sv_rules_and_max_rank(llama_all_linear, tmp_path):
    by_ratio = ah.reduce(llama_all_linear, tmp_path / "ratio", sv_ratio=2.0, max_rank=3)
    adapter = ah.load(llama_all_linear)
    for m in by_ratio.modules:
        f = adapter.factors(m.name)
        s = torch.linalg.svdvals(f.scale * f.B.double() @ f.A.double())
        assert m.rank_after == min(3, int((s >= s[0] / 2.0).sum()))
    by_fro = ah.reduce(llama_all_linear, tmp_path / "fro", sv_fro=0.9)
    assert all(m.retained_energy >= 0.81 - 1e-12 for m in by_fro.modules)


def test_dora_magnitude_and_saved_modules_are_kept(llama_dora, roberta_lora, tmp_path):
    out = ah.reduce(llama_dora, tmp_path / "dora", rank=2).path
    src = load_file(llama_dora / "adapter_model.safetensors")
    dst = load_file(out / "adapter_model.safetensors")
    mags = [k for k in src if k.endswith("lora_magnitude_vector")]
    assert mags and all(torch.equal(src[k], dst[k]) for k in mags)
    out = ah.reduce(roberta_lora, tmp_path / "rob", rank=2).path
    src = load_file(roberta_lora / "adapter_model.safetensors")
    dst = load_file(out / "adapter_model.safetensors")
    saved = [k for k in src if "classifier" in k]
    assert saved and all(torch.equal(src[k], dst[k]) for k in saved)


def test_output_records_provenance(llama_lora, tmp_path):
    out = ah.reduce(llama_lora, tmp_path / "out", rank=4).path
    report = ah.inspect(out)
    prov = json.loads(report.metadata["adapterhub.provenance"])
    assert prov["operation"] == "reduce" and prov["parameters"] == {"rank": 4}
    assert (
        prov["inputs"][0]["sha256"]
        == hashlib.sha256((llama_lora / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "reduce" in card


def test_refuses_bad_input_and_writes_nothing(llama_lora, copy_adapter, tmp_path):
    bad = copy_adapter(llama_lora)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"), {"format": "pt"})
    with pytest.raises(ah.InvalidAdapterError, match="non-finite"):
        ah.reduce(bad, tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(ah.UsageError):
        ah.reduce(llama_lora, tmp_path / "out", rank=2, energy=0.9)


def test_cli(llama_lora, tmp_path):
    runner = CliRunner()
    cli = build_cli()
    res = runner.invoke(cli, ["reduce", str(llama_lora), "-o", str(tmp_path / "a"), "--rank", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["r"] == 4 and len(data["modules"]) == 4
    assert all(0 <= m["rel_error"] < 1 for m in data["modules"])
    res = runner.invoke(cli, ["reduce", str(llama_lora), "-o", str(tmp_path / "a"), "--rank", "4"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(cli, ["reduce", str(llama_lora), "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = runner.invoke(cli, ["reduce", str(llama_lora), "-o", str(tmp_path / "a"), "--rank", "2", "--overwrite"])
    assert res.exit_code == 0 and "relative error" in res.output
    assert ah.load(tmp_path / "a").config.r == 2


def test_a_rule_that_keeps_every_rank_says_nothing_was_reduced(llama_lora, llama_base, tmp_path):
    result = ah.reduce(llama_lora, tmp_path / "same", sv_ratio=1e12)  # every singular value is kept
    assert result.unchanged and all(m.rank_after == m.rank_before for m in result.modules)
    assert len(result.warnings) == 1 and result.warnings[0].startswith("nothing was reduced: --sv-ratio 1e+12")
    # the output holds the same updates: PEFT computes them from both folders alike
    ours, theirs = lora_layers(peft_model(llama_base, result.path)), lora_layers(peft_model(llama_base, llama_lora))
    for name, layer in theirs.items():
        delta = dense_delta(layer)
        assert torch.linalg.norm(dense_delta(ours[name]) - delta) <= 1e-5 * torch.linalg.norm(delta)
    res = CliRunner().invoke(build_cli(), ["reduce", str(llama_lora), "--sv-ratio", "1e12", "-o", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "warning: nothing was reduced: --sv-ratio 1e+12 keeps every module's rank" in " ".join(res.stderr.split())
    args = ["reduce", str(llama_lora), "--sv-ratio", "1e12", "-o", str(tmp_path / "j"), "--json"]
    data = json.loads(CliRunner().invoke(build_cli(), args).stdout)
    assert data["unchanged"] is True and data["warnings"] == result.warnings
    reduced = ah.reduce(llama_lora, tmp_path / "less", energy=0.5)  # a rule that does reduce says nothing more
    assert not reduced.unchanged and reduced.warnings == []


def test_a_fixed_rank_must_reduce_something(llama_patterns, tmp_path):
    ranks = {m.name: m.rank for m in ah.load(llama_patterns).modules.values()}
    largest = max(ranks.values())
    assert min(ranks.values()) < largest  # mixed ranks: a rank between them reduces some modules only
    with pytest.raises(ah.UsageError, match=rf"--rank {largest} is not below .*\(the largest is {largest}\)"):
        ah.reduce(llama_patterns, tmp_path / "out", rank=largest)
    with pytest.raises(ah.UsageError, match="--max-rank caps"):
        ah.reduce(llama_patterns, tmp_path / "out", rank=2, max_rank=4)
    assert not (tmp_path / "out").exists()
    result = ah.reduce(llama_patterns, tmp_path / "out", rank=largest - 1)
    assert {m.name: m.rank_after for m in result.modules} == {n: min(r, largest - 1) for n, r in ranks.items()}
    assert result.warnings == [] and not result.unchanged
