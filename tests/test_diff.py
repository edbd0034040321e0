"""`diff`: factor-space metrics equal dense float64 references; verdicts for identical, scaled and reduced copies."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli


def _dense(adapter: ah.Adapter, name: str) -> torch.Tensor:
    f = adapter.factors(name)
    return f.scale * (f.B.double() @ f.A.double())


def _rewrite(folder, fn) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: fn(k, v) for k, v in tensors.items()}, str(path), {"format": "pt"})


def test_self_diff_is_identical(llama_patterns):
    report = ah.diff(llama_patterns, llama_patterns)
    assert report.verdict == "identical"
    assert report.config_changes == [] and report.only_in_a == [] and report.only_in_b == []
    assert all(m.rel_distance == pytest.approx(0, abs=1e-12) for m in report.modules)
    assert all(m.cosine == pytest.approx(1.0) and m.subspace_overlap == pytest.approx(1.0) for m in report.modules)


def test_metrics_equal_dense_references(llama_lora, llama_rslora):
    a, b = ah.load(llama_lora), ah.load(llama_rslora)
    report = ah.diff(a, b)
    assert report.only_in_b == sorted(n for n in b.modules if n.endswith(("k_proj", "o_proj")))
    assert report.only_in_a == [] and report.verdict == "different"
    assert {c.key for c in report.config_changes} >= {"use_rslora", "target_modules"}
    for m in report.modules:
        da, db = _dense(a, m.name), _dense(b, m.name)
        assert m.norm_a == pytest.approx(float(da.norm()), rel=1e-10)
        assert m.norm_b == pytest.approx(float(db.norm()), rel=1e-10)
        assert m.cosine == pytest.approx(float((da * db).sum() / (da.norm() * db.norm())), rel=1e-9, abs=1e-12)
        assert m.rel_distance == pytest.approx(float((db - da).norm() / da.norm()), rel=1e-9)
        k = min(m.rank_a, m.rank_b)
        ua, _, vha = torch.linalg.svd(da)
        ub, _, vhb = torch.linalg.svd(db)
        left = (ua[:, :k].T @ ub[:, :k]).square().sum() / k
        right = (vha[:k] @ vhb[:k].T).square().sum() / k
        assert m.subspace_overlap == pytest.approx(float(left + right) / 2, abs=1e-9)
    distances = [m.rel_distance for m in report.modules]
    assert distances == sorted(distances, reverse=True)


def test_tiny_distances_are_accurate(llama_lora, copy_adapter):
    """||a - b|| from the factors of the difference, not sqrt(|a|² + |b|² - 2<a,b>), which loses it."""
    b_dir = copy_adapter(llama_lora)
    _rewrite(b_dir, lambda k, v: v.double() * (1 + 1e-9) if "lora_B" in k else v.double())
    a64 = copy_adapter(llama_lora)
    _rewrite(a64, lambda k, v: v.double())
    report = ah.diff(a64, b_dir)
    assert report.verdict == "scaled copy" or report.verdict == "identical"
    for m in report.modules:
        assert m.rel_distance == pytest.approx(1e-9, rel=1e-4)


def test_scaled_copy(llama_lora, copy_adapter):
    half = copy_adapter(llama_lora)
    _rewrite(half, lambda k, v: v * 0.5 if "lora_B" in k else v)
    report = ah.diff(llama_lora, half)
    assert report.verdict == "scaled copy"
    assert report.scale_factor == pytest.approx(0.5, rel=1e-6)


def test_diff_with_reduced_version_shows_what_was_lost(llama_all_linear, tmp_path):
    reduced = ah.reduce(llama_all_linear, tmp_path / "r2", rank=2)
    lost = {m.name: m for m in reduced.modules}
    report = ah.diff(llama_all_linear, reduced.path)
    assert report.verdict == "different"
    assert [c.key for c in report.config_changes] == ["r"]
    for m in report.modules:
        assert m.rel_distance == pytest.approx(lost[m.name].rel_error, rel=1e-5)
        assert m.cosine == pytest.approx(lost[m.name].retained_energy ** 0.5, rel=1e-5)
        assert m.subspace_overlap == pytest.approx(1.0, abs=1e-6)  # the kept subspace is A's own top one
        assert (m.rank_a, m.rank_b) == (4, 2)


def test_adapters_for_different_bases_are_refused(llama_lora, llama_lora_wide):
    with pytest.raises(ah.IncompatibleBaseError, match="different base models"):
        ah.diff(llama_lora, llama_lora_wide)
    res = CliRunner().invoke(build_cli(), ["diff", str(llama_lora), str(llama_lora_wide)])
    assert res.exit_code == 2 and "Error:" in res.output and "Traceback" not in res.output


def test_saved_tensors_are_compared(roberta_lora, copy_adapter):
    other = copy_adapter(roberta_lora)
    _rewrite(other, lambda k, v: v + 1 if "classifier.out_proj.bias" in k else v)
    report = ah.diff(roberta_lora, other)
    assert report.verdict == "different" and report.saved_tensor_changes == ["classifier.out_proj.bias"]


def test_cli(llama_lora, llama_rslora):
    runner = CliRunner()
    cli = build_cli()
    res = runner.invoke(cli, ["diff", str(llama_lora), str(llama_lora), "--exit-code"])
    assert res.exit_code == 0 and "identical" in res.output
    res = runner.invoke(cli, ["diff", str(llama_lora), str(llama_rslora), "--exit-code"])
    assert res.exit_code == 1 and "only in B (4)" in res.output
    res = runner.invoke(cli, ["diff", str(llama_lora), str(llama_rslora), "--json"])
    data = json.loads(res.stdout)
    assert data["verdict"] == "different" and len(data["modules"]) == 4 and len(data["only_in_b"]) == 4
    assert {"name", "norm_a", "norm_b", "cosine", "rel_distance", "subspace_overlap"} <= set(data["modules"][0])
