"""`combine`: cat is exact and agrees with PEFT's cat; linear / svd reach the optimum; TIES / DARE follow PEFT's
merge_utils definitions and are reproducible with a seed; misfits are refused before anything is written."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from fixtures_models import load_base_model
from peft import PeftModel
from peft.utils import merge_utils
from peft_helpers import dense_delta, logits, lora_layers, peft_model
from safetensors.torch import load_file

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from lora_ops import dense_merge


def _deltas(adapter_dir) -> dict[str, torch.Tensor]:
    a = ah.load(adapter_dir)
    out = {}
    for name in a.modules:
        f = a.factors(name)
        out[name] = f.scale * (f.B.double() @ f.A.double())
    return out


def _weighted_sum(dirs, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for d, w in zip(dirs, weights, strict=True):
        for name, delta in _deltas(d).items():
            total[name] = total.get(name, torch.zeros_like(delta)) + w * delta
    return total


@torch.no_grad()
def _logits_with_dense_update(base_dir, updates: dict[str, torch.Tensor]) -> torch.Tensor:
    model = load_base_model(base_dir)
    modules = dict(model.named_modules())
    for name, delta in updates.items():
        weight = modules[name].weight
        weight.copy_((weight.double() + delta).to(weight.dtype))
    return logits(model)


def test_cat_is_exact_with_negative_weights_and_mixed_ranks(
    llama_lora, llama_patterns, llama_rslora, llama_base, tmp_path
):
    dirs, weights = [llama_lora, llama_patterns, llama_rslora], [0.7, -0.5, 1.3]
    result = ah.combine(dirs, tmp_path / "cat", weights=weights, method="cat")
    expected = _weighted_sum(dirs, weights)
    combined = peft_model(llama_base, result.path)
    layers = lora_layers(combined)
    assert set(layers) == set(expected)  # the union of the targets
    for name, layer in layers.items():
        got = dense_delta(layer)
        assert torch.linalg.norm(got - expected[name]) <= 1e-6 * torch.linalg.norm(expected[name])
    torch.testing.assert_close(logits(combined), _logits_with_dense_update(llama_base, expected), rtol=1e-5, atol=1e-5)
    ranks = {m.name: m.rank for m in result.modules}
    q0 = "model.layers.0.self_attn.q_proj"
    assert ranks[q0] == 8 + 8 + 8 and ranks["model.layers.1.self_attn.q_proj"] == 8 + 2 + 8


def test_cat_agrees_with_peft_cat(llama_lora, llama_rslora, llama_base, tmp_path):
    weights = [0.6, 0.4]
    ours = peft_model(llama_base, ah.combine([llama_lora, llama_rslora], tmp_path / "c", weights=weights).path)
    model = PeftModel.from_pretrained(load_base_model(llama_base), str(llama_lora), adapter_name="a")
    model.load_adapter(str(llama_rslora), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "c", combination_type="cat")
    peft_layers = {n: m for n, m in lora_layers(model).items() if "c" in m.lora_A}
    our_layers = lora_layers(ours)
    for name, layer in peft_layers.items():
        theirs = layer.get_delta_weight("c").double()
        assert torch.linalg.norm(dense_delta(our_layers[name]) - theirs) <= 1e-5 * torch.linalg.norm(theirs)


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_linear_and_svd_reach_the_optimum(method, llama_lora, llama_patterns, llama_base, tmp_path):
    dirs, weights = [llama_lora, llama_patterns], [1.0, -0.5]
    result = ah.combine(dirs, tmp_path / method, weights=weights, method=method, rank=3)
    exact = _weighted_sum(dirs, weights)
    layers = lora_layers(peft_model(llama_base, result.path))
    errors = {m.name: m.rel_error for m in result.modules}
    for name, delta in exact.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        optimum = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert errors[name] == pytest.approx(optimum, rel=1e-8, abs=1e-12)
        assert layers[name].r["default"] == 3
        assert torch.linalg.norm(dense_delta(layers[name]) - best) <= 1e-5 * torch.linalg.norm(delta)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_dense_methods_match_peft_merge_utils(method):
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(24, 40, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, -0.7]
    ours = dense_merge(deltas, weights, method, density=0.4, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)  # PEFT draws DARE's masks from the global generator
    peft_fn = getattr(merge_utils, method)
    theirs = peft_fn(deltas, torch.tensor(weights), density=0.4)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_dense_methods_on_adapters_are_seeded_and_compressed_optimally(
    method, llama_lora, llama_rslora, llama_base, tmp_path
):
    dirs, weights = [llama_lora, llama_rslora], [1.0, 0.5]
    seeded = method.startswith("dare")  # only DARE draws: a seed given to ties is refused (it would be ignored)

    def seed(n):
        return {"seed": n} if seeded else {}

    one = ah.combine(dirs, tmp_path / "one", weights=weights, method=method, density=0.5, rank=4, **seed(7))
    two = ah.combine(dirs, tmp_path / "two", weights=weights, method=method, density=0.5, rank=4, **seed(7))
    other = ah.combine(dirs, tmp_path / "other", weights=weights, method=method, density=0.5, rank=4, **seed(8))

    def digest(p):
        return hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest()

    assert digest(one.path) == digest(two.path)

    def tensors(p):
        return load_file(p / "adapter_model.safetensors")

    t_one, t_other = tensors(one.path), tensors(other.path)
    same = all(torch.equal(t_one[k], t_other[k]) for k in t_one)
    assert same != method.startswith("dare")  # only DARE draws random masks
    # the output is the optimal rank-4 approximation of the element-wise merge (recomputed here independently)
    deltas = {d: _deltas(d) for d in dirs}
    generator = torch.Generator().manual_seed(7)
    layers = lora_layers(peft_model(llama_base, one.path))
    for name in sorted(layers):
        members = [(deltas[d][name].float(), w) for d, w in zip(dirs, weights, strict=True) if name in deltas[d]]
        merged = dense_merge(
            [m for m, _ in members], [w for _, w in members], method, density=0.5, generator=generator
        ).double()
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert torch.linalg.norm(dense_delta(layers[name]) - best) <= 1e-5 * torch.linalg.norm(merged)


def test_misfits_are_refused_before_writing(
    llama_lora, llama_lora_wide, llama_dora, roberta_lora, copy_adapter, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(ah.IncompatibleBaseError, match="different base models"):
        ah.combine([llama_lora, llama_lora_wide], out)
    with pytest.raises(ah.UsageError, match="DoRA"):
        ah.combine([llama_lora, llama_dora], out)
    with pytest.raises(ah.UsageError, match="saves full modules"):
        ah.combine([roberta_lora, roberta_lora], out)
    renamed = copy_adapter(llama_lora)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/else"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ah.IncompatibleBaseError, match="different base models"):
        ah.combine([llama_lora, renamed], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert ah.combine([llama_lora, renamed], out, force=True).path == out
    with pytest.raises(ah.UsageError, match="density"):
        ah.combine([llama_lora, llama_lora], tmp_path / "t", method="ties")


def test_cli(llama_lora, llama_rslora, tmp_path):
    runner = CliRunner()
    cli = build_cli()
    args = ["combine", str(llama_lora), str(llama_rslora), "--weights", "0.7,0.3", "--method", "svd", "--rank", "4"]
    res = runner.invoke(cli, [*args, "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["method"] == "svd" and data["weights"] == [0.7, 0.3] and data["r"] == 4
    prov = json.loads(ah.inspect(tmp_path / "o").metadata["adapterhub.provenance"])
    assert prov["operation"] == "combine" and len(prov["inputs"]) == 2
    res = runner.invoke(
        cli, ["combine", str(llama_lora), str(llama_rslora), "--weights", "1", "-o", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "--weights has 1 value(s) for 2 adapter(s)" in res.output
    assert res.output.startswith("Usage: ")  # click's usage path
    assert not (tmp_path / "x").exists()


def test_inputs_that_cancel_are_flagged(llama_lora, llama_base, copy_adapter, tmp_path):
    result = ah.combine([llama_lora, llama_lora], tmp_path / "zero", weights=[1.0, -1.0])
    assert result.is_zero and sorted(result.zero_modules) == sorted(m.name for m in result.modules)
    assert result.warnings == [
        "the combined update is zero in every module (the weighted inputs cancel, or are zero): the output adapter "
        "changes nothing"
    ]
    # what PEFT computes from the output is zero to rounding, against the size of the input's updates
    inputs = lora_layers(peft_model(llama_base, llama_lora))
    for name, layer in lora_layers(peft_model(llama_base, result.path)).items():
        assert torch.linalg.norm(dense_delta(layer)) <= 1e-6 * torch.linalg.norm(dense_delta(inputs[name]))
    res = CliRunner().invoke(
        build_cli(), ["combine", str(llama_lora), str(llama_lora), "--weights", "1,-1", "-o", str(tmp_path / "c")]
    )
    assert res.exit_code == 0, res.output
    assert "warning: the combined update is zero in every module" in " ".join(res.stderr.split())
    # one module changed in the copy: only the others cancel
    changed = copy_adapter(llama_lora)
    tensors = load_file(changed / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key] * 2
    from safetensors.torch import save_file

    save_file(tensors, str(changed / "adapter_model.safetensors"), {"format": "pt"})
    partial = ah.combine([llama_lora, changed], tmp_path / "partial", weights=[1.0, -1.0], method="svd")
    assert not partial.is_zero and len(partial.zero_modules) == len(partial.modules) - 1
    assert partial.warnings[0].startswith(f"{len(partial.modules) - 1} module(s) combine to a zero update")
    assert ah.combine([llama_lora, changed], tmp_path / "none", weights=[1.0, 0.5]).warnings == []


def test_a_rank_above_what_the_combination_holds_is_said(llama_lora, llama_rslora, tmp_path):
    result = ah.combine([llama_lora, llama_rslora], tmp_path / "svd", method="svd", rank=64)
    top = max(m.rank for m in result.modules)
    assert top < 64
    assert result.warnings == [
        f"--rank 64 is above the rank every module's svd combination has (at most {top}): the modules keep that rank"
    ]
