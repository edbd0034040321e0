"""`adapters analyze`: every number against a float64 dense reference built from what PEFT computes (its own
``get_delta_weight``, its DoRA merge), on tiny real models with seeded PEFT adapters."""

from __future__ import annotations

import builtins
import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.errors import IncompatibleBaseError, UsageError
from adapterhub_cli.ops import analyze as ops_analyze
from lora_ops import LoraFactors
from lora_ops.analysis import (
    BaseAccumulator,
    analyze_update,
    random_projection_baseline,
    top_singular,
)
from tests import fixtures_models as fm


PREFIX = "base_model.model."
#: default analyze multiplies W blocks by Q_a in float32: each entry of W Q_a is a 64-term dot product of float32
#: values, rounded to about 64 * 2^-24 ≈ 4e-6 relative at worst; every other step is float64.
FP32_RTOL = 2e-5
#: the float64 path against the float64 dense reference: rounding of a few products of 64 x 64 matrices.
FP64_RTOL = 1e-10


def _peft_model(base: Path, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(fm.load_base_model(base), str(adapter))


def _peft_updates(base: Path, adapter: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, from PEFT: the base weight W and PEFT's own dense update ``get_delta_weight``, both (d_out, d_in)
    in float64, and the DoRA magnitude when there is one; plus the weight after PEFT's merge."""
    model = _peft_model(base, adapter)
    merged = copy.deepcopy(model).merge_and_unload()
    merged_weights = {n: p.detach().double() for n, p in merged.named_parameters()}
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
        w = module.get_base_layer().weight.detach().double()
        delta = module.get_delta_weight("default").detach().double()
        short = name[len(PREFIX) :]
        after = merged_weights[short + ".weight"]
        if fan_in_fan_out:
            w, delta, after = w.T, delta.T, after.T
        entry = {"W": w, "dW": delta, "merged": after}
        mags = getattr(module, "lora_magnitude_vector", None)
        if mags is not None and "default" in mags:
            entry["magnitude"] = mags["default"].weight.detach().double().reshape(-1)
        out[short] = entry
    return out


#: PEFT's get_delta_weight computes dW in float32: its float64 SVD holds rounding-noise singular values near 1e-7 σ_1
#: beyond the true rank, so the reference counts the rank above this relative threshold.
PEFT_RANK_TOL = 1e-5


def _dense(
    W: torch.Tensor, dW: torch.Tensor, magnitude: torch.Tensor | None = None, *, rank_tol: float = PEFT_RANK_TOL
) -> dict[str, float | None]:
    """Every number of ``analyze`` from the dense float64 matrices: full SVD, explicit projections and row norms."""
    m, n = W.shape
    u, s, vh = torch.linalg.svd(dW, full_matrices=False)
    k = int((s > rank_tol * s[0]).sum()) if float(s[0]) > 0 else 0
    nw, ndw = float(W.norm()), float(dW.norm())
    ref: dict[str, float | None] = {"rank": k, "norm_W": nw, "norm_dW": ndw, "rel_fro": ndw / nw}
    if k:
        proj = u[:, :k].T @ W @ vh[:k].T
        ref["cos_W"] = float((W * dW).sum()) / (nw * ndw)
        ref["proj_fro"] = float(proj.norm())
        ref["amplification"] = ndw / float(proj.norm())
        ref["random_proj"] = k * nw / math.sqrt(m * n)
        ref["alignment_over_random"] = float(proj.norm()) / ref["random_proj"]
    else:
        for key in ("cos_W", "proj_fro", "amplification", "random_proj", "alignment_over_random"):
            ref[key] = None
    after = W + dW
    cos = (after * W).sum(1) / (after.norm(dim=1) * W.norm(dim=1))
    ref["dD"] = float((1 - cos).mean())
    if magnitude is None:
        ref["dM"] = float((after.norm(dim=1) - W.norm(dim=1)).abs().mean())
    else:
        ref["dM"] = float((magnitude - W.norm(dim=1)).abs().mean())
        eff = (magnitude / after.norm(dim=1))[:, None] * after
        ref["dora_eff_fro"] = float((eff - W).norm())
    return ref


def _close(got: float | None, want: float | None, rtol: float, scale: float = 1.0) -> bool:
    if want is None or got is None:
        return got is None and want is None
    return abs(got - want) <= rtol * max(abs(want), scale)


def _check_report(report: ah.AnalyzeReport, peft: dict[str, dict[str, torch.Tensor]], rtol: float) -> None:
    assert sorted(m.module for m in report.modules) == sorted(peft)
    for row in report.modules:
        p = peft[row.module]
        ref = _dense(p["W"], p["dW"], p.get("magnitude"))
        assert row.rank == ref["rank"], row.module
        keys = ("norm_W", "norm_dW", "rel_fro", "proj_fro", "amplification", "random_proj", "alignment_over_random")
        for key in keys:
            assert _close(getattr(row, key), ref[key], rtol), (row.module, key, getattr(row, key), ref[key])
        # the cosine, dM and dD can be near 0: compared on an absolute scale
        assert _close(row.cos_W, ref["cos_W"], rtol), (row.module, row.cos_W, ref["cos_W"])
        assert _close(row.dD, ref["dD"], rtol, scale=1e-3), (row.module, row.dD, ref["dD"])
        assert _close(row.dM, ref["dM"], rtol, scale=1e-3), (row.module, row.dM, ref["dM"])


def test_llama_lora_every_number_matches_peft_dense(llama_base: Path, llama_lora: Path) -> None:
    report = ah.analyze(llama_lora, base=llama_base)
    peft = _peft_updates(llama_base, llama_lora)
    _check_report(report, peft, FP32_RTOL)
    assert report.training_state == "trained"
    assert {f.name for f in report.families} == {"q_proj", "v_proj"}
    assert [g.name for g in report.layers] == ["0", "1"]
    # PEFT's merge adds exactly dW: the merged weight's change is the update analyze measured
    for row in report.modules:
        p = peft[row.module]
        assert abs(float((p["merged"] - p["W"]).norm()) - row.norm_dW) <= 1e-5 * row.norm_dW


def test_float64_path_matches_dense_to_rounding(llama_base: Path, llama_all_linear: Path) -> None:
    """lora_ops.analysis in float64 (every projection), streamed 5 rows at a time, against the dense reference."""
    adapter = ah.load(llama_all_linear)
    peft = _peft_updates(llama_base, llama_all_linear)
    assert len(peft) == 14  # all 7 linear projections x 2 layers: rectangular MLP weights included
    for name, p in peft.items():
        f = adapter.factors(name)
        got = analyze_update(f, p["W"], block_rows=5, dtype=torch.float64)
        dense_dw = f.scale * f.B.double() @ f.A.double()
        assert torch.allclose(dense_dw, p["dW"], rtol=1e-5, atol=1e-7)  # the factors are PEFT's update
        ref = _dense(p["W"], dense_dw, rank_tol=1e-12)
        for key in ("rel_fro", "cos_W", "proj_fro", "amplification", "random_proj", "alignment_over_random"):
            assert _close(getattr(got, key), ref[key], FP64_RTOL), (name, key)
        assert _close(got.dM, ref["dM"], FP64_RTOL, scale=1e-6)
        assert _close(got.dD, ref["dD"], FP64_RTOL, scale=1e-6)
        # per-direction alignment u_iᵀ W v_i, up to the sign of each singular pair (dense SVD picks its own)
        u, s, vh = torch.linalg.svd(dense_dw, full_matrices=False)
        dense_dirs = torch.stack([u[:, i] @ p["W"] @ vh[i] for i in range(got.rank)])
        assert torch.allclose(torch.tensor(got.dir_alignment, dtype=torch.float64).abs(), dense_dirs.abs(), atol=1e-9)
        assert torch.allclose(torch.tensor(got.sigma, dtype=torch.float64), s[: got.rank], rtol=1e-12)


def test_gpt2_conv1d_transposed_storage(gpt2_base: Path, gpt2_lora: Path) -> None:
    """GPT-2's Conv1D stores W as (d_in, d_out): analyze reads it transposed and reports the same numbers."""
    report = ah.analyze(gpt2_lora, base=gpt2_base)
    peft = _peft_updates(gpt2_base, gpt2_lora)
    _check_report(report, peft, FP32_RTOL)
    assert {m.shape for m in report.modules} >= {(192, 64), (64, 64)}


def test_dora_magnitude_and_effective_update_match_peft_merge(llama_base: Path, llama_dora: Path) -> None:
    report = ah.analyze(llama_dora, base=llama_base)
    peft = _peft_updates(llama_base, llama_dora)
    _check_report(report, peft, FP32_RTOL)
    for row in report.modules:
        p = peft[row.module]
        assert row.dora
        ref = _dense(p["W"], p["dW"], p["magnitude"])
        assert _close(row.dora_eff_fro, ref["dora_eff_fro"], FP32_RTOL)
        # and that is the change PEFT's DoRA merge makes to the weight
        merged_change = float((p["merged"] - p["W"]).norm())
        assert row.dora_eff_fro is not None and abs(row.dora_eff_fro - merged_change) <= 1e-5 * merged_change
        assert row.dora_rel_fro == pytest.approx(row.dora_eff_fro / row.norm_W, rel=1e-12)
    assert any("DoRA" in n for n in report.notes)


def _fresh_lora(base: Path, out: Path) -> Path:
    """A PEFT LoRA exactly as initialised (B = 0) and saved: its update is zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(fm.load_base_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.save_pretrained(out)
    return out


def test_zero_update_is_reported_not_divided(llama_base: Path, tmp_path: Path) -> None:
    adapter = _fresh_lora(llama_base, tmp_path / "fresh")
    report = ah.analyze(adapter, base=llama_base)
    assert report.training_state == "init_only"
    for row in report.modules:
        assert row.reason == "zero_update" and row.rank == 0 and row.norm_dW == 0.0
        assert row.rel_fro == 0.0 and row.dM == 0.0 and row.dD == 0.0
        assert row.cos_W is None and row.proj_fro is None and row.amplification is None
        assert row.random_proj is None and row.alignment_over_random is None
    fam = report.families[0]
    assert fam.zero_updates == 2 and fam.amplification is None and fam.rel_fro == 0.0
    res = CliRunner().invoke(build_cli(), ["analyze", str(adapter), "--base", str(llama_base), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["training_state"] == "init_only"
    assert all(m["amplification"] is None and m["reason"] == "zero_update" for m in doc["modules"])
    res = CliRunner().invoke(build_cli(), ["analyze", str(adapter), "--base", str(llama_base)])
    assert res.exit_code == 0 and "zero update" in res.output


def test_partly_zero_adapter(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    """One module's B zeroed: that module is a zero update, the others unchanged, the adapter 'partial'."""
    copy_dir = tmp_path / "partial"
    copy_dir.mkdir()
    for f in llama_lora.iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(copy_dir / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.0.self_attn.q_proj.lora_B" in k)
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, copy_dir / "adapter_model.safetensors")
    report = ah.analyze(copy_dir, base=llama_base)
    full = {m.module: m for m in ah.analyze(llama_lora, base=llama_base).modules}
    assert report.training_state == "partial"
    for row in report.modules:
        if row.module == "model.layers.0.self_attn.q_proj":
            assert row.reason == "zero_update" and row.amplification is None
        else:
            assert row.amplification == full[row.module].amplification


def _haar(rows: int, k: int, gen: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Haar-random (..., rows, k) matrices with orthonormal columns: QR of Gaussians, R's diagonal made positive."""
    q, r = torch.linalg.qr(torch.randn(*batch, rows, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def test_random_baseline_closed_form_against_monte_carlo(llama_base: Path) -> None:
    """E ||Uᵀ W V||² = k² ||W||² / (m n) for Haar-random U, V: the closed form against 4000 seeded draws.

    Tolerance: the Monte-Carlo mean of ||Uᵀ W V||² has standard error sd / sqrt(N) (sd from the same draws), so the
    closed form must lie within 4 standard errors (a false failure has probability about 6e-5; the seed fixes it).
    """
    w = load_file(llama_base / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].double()  # (128, 64)
    m, n = w.shape
    gen = torch.Generator().manual_seed(1234)
    for k in (1, 4, 8):
        u, v = _haar(m, k, gen, (4000,)), _haar(n, k, gen, (4000,))
        draws = (u.transpose(-1, -2) @ w @ v).square().sum((-1, -2))
        expected = random_projection_baseline(float(w.norm()), m, n, k) ** 2
        stderr = float(draws.std()) / math.sqrt(draws.numel())
        assert abs(float(draws.mean()) - expected) <= 4 * stderr, (k, float(draws.mean()), expected, stderr)
        assert stderr < 0.05 * expected  # the check has teeth: 4 standard errors are under 20 % of the value
    # and analyze reports exactly the closed form for the update's numerical rank
    f = LoraFactors(torch.randn(4, n, dtype=torch.float64), torch.randn(m, 4, dtype=torch.float64), 1.0)
    got = analyze_update(f, w, dtype=torch.float64)
    assert got.random_proj == pytest.approx(4 * float(w.norm()) / math.sqrt(m * n), rel=1e-14)


def test_rank_deficient_update_uses_numerical_rank() -> None:
    """B of rank 2 at r = 6: U, V, the projection and the random baseline use the 2 real directions."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    b = torch.randn(40, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, generator=gen, dtype=torch.float64)
    f = LoraFactors(torch.randn(6, 30, generator=gen, dtype=torch.float64), b, 0.5)
    got = analyze_update(f, w, dtype=torch.float64)
    ref = _dense(w, 0.5 * b @ f.A, rank_tol=1e-12)
    assert got.rank == ref["rank"] == 2
    for key in ("proj_fro", "amplification", "random_proj", "alignment_over_random"):
        assert _close(getattr(got, key), ref[key], 1e-10), key


def test_streaming_blocks_do_not_change_the_numbers(
    llama_base: Path, llama_all_linear: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base weight read 3 rows at a time (many pread blocks) gives the same numbers as in one block."""
    whole = ah.analyze(llama_all_linear, base=llama_base)
    monkeypatch.setattr(ops_analyze, "BLOCK_BYTES", 4 * 64 * 3)
    blocks = ah.analyze(llama_all_linear, base=llama_base)
    for a, b in zip(whole.modules, blocks.modules, strict=True):
        assert a.module == b.module
        for key in ("rel_fro", "cos_W", "proj_fro", "amplification", "dM", "dD"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-6, abs=1e-12), (a.module, key)


def test_sharded_base_gives_the_same_report(llama_base: Path, llama_base_sharded: Path, llama_lora: Path) -> None:
    a = ah.analyze(llama_lora, base=llama_base)
    b = ah.analyze(llama_lora, base=llama_base_sharded)
    assert [(m.module, m.rel_fro, m.amplification) for m in a.modules] == [
        (m.module, m.rel_fro, m.amplification) for m in b.modules
    ]


def test_base_top_overlaps_match_dense(llama_base: Path, llama_lora: Path) -> None:
    k = 4
    report = ah.analyze(llama_lora, base=llama_base, base_top=k)
    peft = _peft_updates(llama_base, llama_lora)
    assert report.base_top_k == k
    for row in report.modules:
        p = peft[row.module]
        uw, sw, vwh = torch.linalg.svd(p["W"], full_matrices=False)
        u, s, vh = torch.linalg.svd(p["dW"], full_matrices=False)
        r = row.rank
        top = row.base_top
        assert top is not None and top["k"] == k
        want_out = float((uw[:, :k].T @ u[:, :r]).square().sum()) / min(k, r)
        want_in = float((vwh[:k] @ vh[:r].T).square().sum()) / min(k, r)
        assert top["overlap_out"] == pytest.approx(want_out, rel=FP32_RTOL, abs=1e-9)
        assert top["overlap_in"] == pytest.approx(want_in, rel=FP32_RTOL, abs=1e-9)
        assert top["random_out"] == max(k, r) / p["W"].shape[0]
        assert top["w_top_proj"] == pytest.approx(float(sw[: min(k, r)].norm()), rel=1e-6)
        assert top["spec_rel"] == pytest.approx(float(s[0] / sw[0]), rel=1e-6)


def test_randomized_top_singular_is_seeded_and_accurate() -> None:
    """The randomized SVD path (forced with exact_max=0) on a 600 x 400 matrix with a spectral gap recovers the
    exact top-6 subspaces and values; the same seed gives the same result."""
    gen = torch.Generator().manual_seed(3)
    u = _haar(600, 400, gen)
    v = _haar(400, 400, gen)
    s = torch.cat([torch.tensor([50.0, 40, 30, 20, 15, 10], dtype=torch.float64), torch.full((394,), 0.5)])
    w = (u * s) @ v.T
    U, S, V = top_singular(w, 6, exact_max=0, seed=7, dtype=torch.float64)
    assert torch.allclose(S, s[:6], rtol=1e-8)
    assert float((U.T @ u[:, :6]).square().sum()) / 6 == pytest.approx(1.0, abs=1e-8)
    assert float((V.T @ v[:, :6]).square().sum()) / 6 == pytest.approx(1.0, abs=1e-8)
    U2, S2, _ = top_singular(w, 6, exact_max=0, seed=7, dtype=torch.float64)
    assert torch.equal(U, U2) and torch.equal(S, S2)


def test_accumulator_refuses_missing_rows() -> None:
    acc = BaseAccumulator(LoraFactors(torch.randn(2, 6), torch.randn(8, 2), 1.0))
    acc.add(0, torch.randn(5, 6))
    with pytest.raises(Exception, match="5 of 8 rows"):
        acc.finish()


def test_cli_json_keys(llama_base: Path, llama_dora: Path) -> None:
    res = CliRunner().invoke(
        build_cli(), ["analyze", str(llama_dora), "--base", str(llama_base), "--json", "--base-top", "2"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    want = {
        "module",
        "rel_fro",
        "cos_W",
        "proj_fro",
        "amplification",
        "random_proj",
        "alignment_over_random",
        "dM",
        "dD",
        "base_top",
        "reason",
        "dora_eff_fro",
        "dora_rel_fro",
    }
    assert len(doc["modules"]) == 4
    for m in doc["modules"]:
        assert want <= set(m)
        assert {"overlap_out", "overlap_in", "random_out", "random_in", "k"} <= set(m["base_top"])
        assert m["dora_eff_fro"] is not None
    assert {f["name"] for f in doc["families"]} == {"q_proj", "v_proj"}
    assert {"rel_fro", "amplification", "alignment_over_random", "dM", "dD", "modules"} <= set(doc["families"][0])
    assert [g["name"] for g in doc["layers"]] == ["0", "1"]
    assert doc["base_top_k"] == 2


@pytest.mark.parametrize("width", [60, 80, 120])
def test_cli_tables_keep_names_and_numbers_whole(
    llama_base: Path, llama_all_linear: Path, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    args = ["analyze", str(llama_all_linear), "--base", str(llama_base), "--base-top", "2"]
    res = CliRunner().invoke(build_cli(), args)
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= width
    report = ah.analyze(llama_all_linear, base=llama_base, base_top=2)
    for m in report.modules:
        # the name whole (or its tail, after a common prefix written once above the table) and its numbers whole
        assert m.module.split("layers.", 1)[1] in res.output
        assert format(m.amplification, ".3g") in res.output
        assert format(m.rel_fro, ".3g") in res.output
        assert m.base_top is not None and format(m.base_top["overlap_out"], ".3g") in res.output
    assert "by module family" in res.output and "by layer" in res.output


def test_plot_writes_a_png(llama_base: Path, llama_all_linear: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "analyze.png"
    res = CliRunner().invoke(
        build_cli(), ["analyze", str(llama_all_linear), "--base", str(llama_base), "--plot", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 400
        assert "adapterhub.analyze" in img.info
    # an existing plot: refused without --overwrite, replaced with it; another existing file is never replaced
    res = CliRunner().invoke(
        build_cli(), ["analyze", str(llama_all_linear), "--base", str(llama_base), "--plot", str(out)]
    )
    assert res.exit_code != 0 and "exists" in res.output
    res = CliRunner().invoke(
        build_cli(),
        ["analyze", str(llama_all_linear), "--base", str(llama_base), "--plot", str(out), "--overwrite"],
    )
    assert res.exit_code == 0, res.output
    other = tmp_path / "photo.png"
    other.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    with pytest.raises(UsageError, match="not a plot written by adapters analyze"):
        ah.analyze(llama_all_linear, base=llama_base, plot=other, overwrite=True)
    assert other.read_bytes().endswith(b"not ours")
    with pytest.raises(UsageError, match="PNG"):
        ah.analyze(llama_all_linear, base=llama_base, plot=tmp_path / "plot.jpg")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_plot_follows_the_umask_and_leaves_no_temporary(
    llama_base: Path, llama_lora: Path, tmp_path: Path, umask: int
) -> None:
    """The PNG is written to an unguessable temporary created exclusively beside it (never a planted link), gets
    the umask's mode like any output, and nothing else stays in the folder."""
    pytest.importorskip("matplotlib")
    import os
    import stat

    folder = tmp_path / "plots"
    folder.mkdir()
    before = os.umask(umask)
    try:
        ah.analyze(llama_lora, base=llama_base, plot=folder / "a.png")
    finally:
        os.umask(before)
    assert [p.name for p in folder.iterdir()] == ["a.png"]
    assert stat.S_IMODE((folder / "a.png").stat().st_mode) == 0o666 & ~umask


def test_missing_matplotlib_gives_the_install_hint(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "plot.png"
    res = CliRunner().invoke(build_cli(), ["analyze", str(llama_lora), "--base", str(llama_base), "--plot", str(out)])
    assert res.exit_code == 2, res.output
    assert "pip install 'adapterhub-cli[plot]'" in res.output
    assert not out.exists()


def test_base_that_does_not_fit_is_a_clear_error(llama_base: Path, llama_lora_wide: Path) -> None:
    with pytest.raises(IncompatibleBaseError, match=r"model\.layers\.0\.self_attn\.q_proj: the update is 96 x 96"):
        ah.analyze(llama_lora_wide, base=llama_base)
    res = CliRunner().invoke(build_cli(), ["analyze", str(llama_lora_wide), "--base", str(llama_base)])
    assert res.exit_code != 0 and "adapters validate" in res.output


def test_store_base_read_by_range_gives_the_same_report(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    """A base in a file:// registry: each weight read by one range read (no shard fetched), same numbers."""
    registry = tmp_path / "registry"
    registry.mkdir()
    ref = f"file://{registry}/acme/llama"
    ah.push(llama_base, ref, version="1.0.0", force=True)
    view = ah.open_base(ref + "@1.0.0")
    assert view.read_raw is not None
    got = ah.analyze(llama_lora, base=ref + "@1.0.0")
    want = ah.analyze(llama_lora, base=llama_base)
    assert got.base == ref + "@1.0.0"
    assert [(m.module, m.rel_fro, m.proj_fro, m.dM, m.dD) for m in got.modules] == [
        (m.module, m.rel_fro, m.proj_fro, m.dM, m.dD) for m in want.modules
    ]


def test_base_top_with_many_blocks_gives_the_same_overlaps(
    llama_base: Path, llama_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--base-top keeps every row block of W: read 3 rows at a time, W's top subspaces are the same as in one block."""
    whole = ah.analyze(llama_lora, base=llama_base, base_top=4)
    monkeypatch.setattr(ops_analyze, "BLOCK_BYTES", 4 * 64 * 3)
    blocks = ah.analyze(llama_lora, base=llama_base, base_top=4)
    for a, b in zip(whole.modules, blocks.modules, strict=True):
        assert a.base_top is not None and b.base_top is not None
        for key in ("overlap_out", "overlap_in", "w_top_proj", "spec_rel"):
            assert a.base_top[key] == pytest.approx(b.base_top[key], rel=1e-5, abs=1e-9), (a.module, key)


def test_base_weight_with_nan_is_refused(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    import shutil

    from adapterhub_cli.errors import InvalidAdapterError

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    weights = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = weights[key].clone()
    weights[key][1, 2] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match=r"q_proj\.weight holds NaN or inf"):
        ah.analyze(llama_lora, base=base)
    res = CliRunner().invoke(build_cli(), ["analyze", str(llama_lora), "--base", str(base), "--json"])
    assert res.exit_code != 0 and "NaN" in res.output


def test_a_base_weight_of_three_dimensions_is_refused(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    """A q_proj weight stored as (d, d/8, 8) holds as many values as the update but is no matrix: validate refuses
    it (shape-mismatch), and so does analyze, which used to read it as one."""
    import shutil

    from adapterhub_cli.errors import IncompatibleBaseError

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    weights = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    d = weights[key].shape[0]
    weights[key] = weights[key].reshape(d, d // 8, 8).contiguous()
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert "shape-mismatch" in {f.code for f in ah.validate(llama_lora, base=base).errors}
    with pytest.raises(IncompatibleBaseError, match="q_proj"):
        ah.analyze(llama_lora, base=base)
    res = CliRunner().invoke(build_cli(), ["analyze", str(llama_lora), "--base", str(base), "--json"])
    assert res.exit_code == 2 and "q_proj" in res.output


def test_a_base_weight_near_the_float32_limit_is_measured_in_float64(
    llama_base: Path, llama_lora: Path, tmp_path: Path
) -> None:
    """Entries near 3e38 are finite, but float32 products of them are not: the module is measured again in
    float64, so the report holds numbers, not NaN with exit 0."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    weights = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = torch.full_like(weights[key], 3e38) * torch.sign(torch.randn(weights[key].shape))
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    report = ah.analyze(llama_lora, base=base, base_top=2)
    row = next(r for r in report.modules if r.module == "model.layers.0.self_attn.q_proj")
    numbers = [v for v in vars(row).values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers), row
    res = CliRunner().invoke(build_cli(), ["analyze", str(llama_lora), "--base", str(base), "--json"])
    assert res.exit_code == 0 and "nan" not in res.output.lower()
