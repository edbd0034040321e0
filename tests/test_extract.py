"""`extract`: a LoRA from a full fine-tune, compared with PEFT and with float64 dense truncated SVDs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures_models import load_base_model
from peft_helpers import dense_delta, logits, lora_layers, peft_model, read_checkpoint

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.errors import IncompatibleBaseError
from lora_ops import choose_rank, extract_lora, extract_lora_like


def _peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A (float64, (d_out, d_in)) of every LoRA layer PEFT builds from ``adapter`` on ``base``."""
    model = peft_model(base, adapter)
    with torch.no_grad():
        return {name: dense_delta(layer) for name, layer in lora_layers(model).items()}


@pytest.fixture(scope="module")
def merged_llama(llama_base: Path, llama_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 llama with the seeded r=8 q_proj/v_proj LoRA merged in by ``adapters merge``."""
    return ah.merge(llama_lora, base=llama_base, out=tmp_path_factory.mktemp("extract") / "merged").path


@pytest.fixture(scope="module")
def finetuned_llama(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (short) full fine-tune of the tiny llama: 4 AdamW steps on seeded random tokens, every parameter."""
    torch.manual_seed(0)
    model = load_base_model(llama_base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(2, 128, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = tmp_path_factory.mktemp("extract") / "finetuned"
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["auto", "randomized"])
def test_a_merged_lora_comes_back(method, llama_base, llama_lora, merged_llama, tmp_path):
    result = ah.extract(llama_base, merged_llama, out=tmp_path / "x", rank=8, method=method)
    want = _peft_deltas(llama_base, llama_lora)
    got = _peft_deltas(llama_base, result.path)
    assert set(got) == set(want) == {m.name for m in result.modules}
    assert result.target_modules == ["q_proj", "v_proj"] and result.r == 8 and result.rank_pattern == {}
    cfg = json.loads((result.path / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"] is False
    for name, delta in want.items():
        # merged = fl32(W + dW): dW comes back within the float32 rounding of W (|W| ~ 0.02: ulp/2 ~ 1e-9)
        torch.testing.assert_close(got[name], delta, rtol=0, atol=2e-7)
    expected_method = "exact" if method == "auto" else "randomized"
    for m in result.modules:
        assert m.method == expected_method and m.rank == 8 and m.rel_error < 1e-5
    assert result.changed == [] and result.unchanged == len(read_checkpoint(llama_base)) - len(want)


def test_sharded_base_against_a_single_file_tuned(llama_base, llama_base_sharded, merged_llama, tmp_path):
    a = ah.extract(llama_base, merged_llama, out=tmp_path / "a", rank=8)
    b = ah.extract(llama_base_sharded, merged_llama, out=tmp_path / "b", rank=8)
    ta, tb = read_checkpoint(a.path), read_checkpoint(b.path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_full_finetune_at_energy_09_is_the_dense_optimum(llama_base, finetuned_llama, tmp_path):
    result = ah.extract(llama_base, finetuned_llama, out=tmp_path / "x", energy=0.9, embeddings="save")
    base_w, tuned_w = read_checkpoint(llama_base), read_checkpoint(finetuned_llama)
    rows = {m.name: m for m in result.modules}
    linear = {k[: -len(".weight")] for k, v in base_w.items() if v.dim() == 2 and "layers." in k}
    assert set(rows) == linear  # every projection changed and was extracted
    truncated: dict[str, torch.Tensor] = {}
    for name, row in rows.items():
        delta = tuned_w[name + ".weight"].double() - base_w[name + ".weight"].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = choose_rank(s, energy=0.9)
        assert row.rank == k, name
        optimum = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        assert math.isclose(row.rel_error, optimum, rel_tol=1e-5), (name, row.rel_error, optimum)
        assert row.opt_rel_error == row.rel_error and row.method == "exact"
        truncated[name] = (u[:, :k] * s[:k]) @ vh[:k]
    # embeddings and lm_head: full copies; norms: reported and left out
    actions = {c.name: c.action for c in result.changed}
    assert actions["model.embed_tokens.weight"] == actions["lm_head.weight"] == "saved"
    assert {n for n, a in actions.items() if a == "reported"} == {k for k in base_w if "norm" in k}
    assert result.modules_to_save == ["embed_tokens", "lm_head"]
    cfg = json.loads((result.path / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] == result.rank_pattern and cfg["lora_alpha"] == result.r

    # the reference: base weights + truncated dW, tuned embeddings and head, base norms, built by hand
    reference = load_base_model(llama_base)
    with torch.no_grad():
        params = dict(reference.named_parameters())
        for name, t in truncated.items():
            params[name + ".weight"].copy_((base_w[name + ".weight"].double() + t).float())
        params["model.embed_tokens.weight"].copy_(tuned_w["model.embed_tokens.weight"])
        params["lm_head.weight"].copy_(tuned_w["lm_head.weight"])
    got = logits(peft_model(llama_base, result.path))
    torch.testing.assert_close(got, logits(reference), rtol=0, atol=2e-5)


def test_provenance_records_both_inputs(llama_base, llama_base_sharded, merged_llama, tmp_path):
    a = ah.extract(llama_base, merged_llama, out=tmp_path / "a", rank=8)
    b = ah.extract(llama_base_sharded, merged_llama, out=tmp_path / "b", rank=8)
    prov = [ah.load(p).provenance for p in (a.path, b.path)]
    assert all(p.operation == "extract" and p.parameters["rank"] == 8 for p in prov)
    inputs = [{i["role"]: i for i in p.inputs} for p in prov]
    assert inputs[0]["base"]["source"] == str(llama_base) and inputs[0]["tuned"]["source"] == str(merged_llama)
    # the weights' digest does not depend on the shard layout; the two inputs differ
    assert inputs[0]["base"]["sha256"] == inputs[1]["base"]["sha256"] != inputs[0]["tuned"]["sha256"]
    assert all(len(i["sha256"] or "") == 64 for i in inputs[0].values())


def test_embeddings_as_lora_and_skipped(llama_base, finetuned_llama, tmp_path):
    result = ah.extract(llama_base, finetuned_llama, out=tmp_path / "x", rank=4, embeddings="lora")
    base_w, tuned_w = read_checkpoint(llama_base), read_checkpoint(finetuned_llama)
    model = peft_model(llama_base, result.path)
    layers = lora_layers(model)
    emb = layers["model.embed_tokens"]
    with torch.no_grad():
        got = (emb.lora_embedding_B["default"] @ emb.lora_embedding_A["default"]).T.double() * emb.scaling["default"]
        delta = tuned_w["model.embed_tokens.weight"].double() - base_w["model.embed_tokens.weight"].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        torch.testing.assert_close(got, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-6)
        head = dense_delta(layers["lm_head"])
        delta = tuned_w["lm_head.weight"].double() - base_w["lm_head.weight"].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        torch.testing.assert_close(head, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-6)
    skipped = ah.extract(llama_base, finetuned_llama, out=tmp_path / "y", rank=4)
    left_out = {c.name for c in skipped.changed if c.action == "skipped"}
    assert left_out == {"model.embed_tokens.weight", "lm_head.weight"}
    assert any("embed_tokens" in w and "--embeddings" in w for w in skipped.warnings)
    assert "lm_head" not in {m.name for m in skipped.modules}


def test_gpt2_conv1d(gpt2_base, gpt2_lora, tmp_path):
    merged = ah.merge(gpt2_lora, base=gpt2_base, out=tmp_path / "merged").path
    result = ah.extract(gpt2_base, merged, out=tmp_path / "x", rank=4)
    cfg = json.loads((result.path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and sorted(cfg["target_modules"]) == ["c_attn", "c_proj"]
    assert {m.kind for m in result.modules} == {"conv1d"}
    want, got = _peft_deltas(gpt2_base, gpt2_lora), _peft_deltas(gpt2_base, result.path)
    assert set(got) == set(want)
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=0, atol=2e-7)
    merged_model = load_base_model(merged)
    torch.testing.assert_close(logits(peft_model(gpt2_base, result.path)), logits(merged_model), rtol=0, atol=1e-5)


def test_conv2d_factors_in_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 10, 3, padding=1))
    delta = torch.einsum("or,rikl->oikl", torch.randn(10, 3), torch.randn(3, 6, 3, 3))
    delta += 1e-3 * torch.randn(10, 6, 3, 3)
    x = extract_lora_like(delta, "conv", rank=3)
    assert x is not None and x.A.shape == (3, 6, 3, 3) and x.B.shape == (10, 3, 1, 1)
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=3, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(x.A)
        layer.lora_B["default"].weight.copy_(x.B)
        got = layer.get_delta_weight("default").double()
    u, s, vh = torch.linalg.svd(delta.reshape(10, -1).double(), full_matrices=False)
    want = ((u[:, :3] * s[:3]) @ vh[:3]).reshape(10, 6, 3, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_randomized_error_is_exact_and_near_the_optimum():
    gen = torch.Generator().manual_seed(0)
    m, n = 700, 600
    delta = torch.randn(m, 24, generator=gen) @ torch.randn(24, n, generator=gen) * 0.05
    delta += 1e-2 * torch.randn(m, n, generator=gen)
    x = extract_lora(delta, rank=16, method="randomized", seed=3)
    y = extract_lora(delta, rank=16, method="randomized", seed=3)
    assert x is not None and y is not None and torch.equal(x.A, y.A)  # seeded
    d64 = delta.double()
    achieved = float((d64 - x.B.double() @ x.A.double()).norm() / d64.norm())
    s = torch.linalg.svdvals(d64)
    optimum = float(s[16:].square().sum().sqrt() / s.square().sum().sqrt())
    assert math.isclose(x.rel_error, achieved, rel_tol=1e-4)  # the reported error is the factors' error
    assert optimum <= achieved < optimum * 1.01
    assert x.opt_rel_error <= x.rel_error and x.method == "randomized"
    # a dynamic rule grows the sketch until the rule is decided inside it
    z = extract_lora(delta, energy=0.95, method="randomized")
    assert z is not None and z.rank == choose_rank(s, energy=0.95)


def test_refusals(llama_base, llama_base_wide, merged_llama, tmp_path):
    with pytest.raises(IncompatibleBaseError, match="in --base but"):
        ah.extract(llama_base, llama_base_wide, out=tmp_path / "x", rank=4)
    with pytest.raises(ah.InvalidAdapterError, match="nothing to extract"):
        ah.extract(llama_base, llama_base, out=tmp_path / "y", rank=4)
    with pytest.raises(ah.InvalidAdapterError, match="nothing to extract"):
        ah.extract(llama_base, merged_llama, out=tmp_path / "z", rank=4, targets="k_proj")
    assert not any(tmp_path.iterdir())


def test_cli(llama_base, llama_base_wide, merged_llama, tmp_path):
    cli = build_cli()
    run = CliRunner().invoke
    out = str(tmp_path / "x")
    res = run(cli, ["extract", "--base", str(llama_base), "--tuned", str(merged_llama), "-o", out])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = run(cli, ["extract", "--base", str(llama_base), "--tuned", str(merged_llama), "-o", out, "--rank", "4",
                    "--max-rank", "2"])  # fmt: skip
    assert res.exit_code == 2 and "--max-rank" in res.output
    res = run(cli, ["extract", "--base", str(llama_base), "--tuned", str(llama_base_wide), "-o", out, "--rank", "4"])
    assert res.exit_code != 0 and "in --base but" in res.output
    res = run(cli, ["extract", "--base", str(llama_base), "--tuned", str(merged_llama), "-o", out, "--rank", "8",
                    "--targets", "q_proj", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["target_modules"] == ["q_proj"] and {m["rank"] for m in doc["modules"]} == {8}
    assert [c["why"] for c in doc["changed"]] == ["not in --targets"] * 2  # the two v_proj
    res = run(cli, ["extract", "--base", str(llama_base), "--tuned", str(merged_llama), "-o", str(tmp_path / "t"),
                    "--sv-ratio", "1e6"])  # fmt: skip
    assert res.exit_code == 0 and "relative error" in res.output and "optimum" in res.output


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.proj = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.conv_in(x)).mean(dim=(2, 3)))


def test_conv2d_end_to_end(tmp_path):
    from fixtures_models import randomize_adapter_weights
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = _ConvNet()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"architectures": ["ConvNet"]}))
    lora = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["conv_in", "proj", "head"]))
    randomize_adapter_weights(lora, seed=1, scale=0.1)
    lora.save_pretrained(str(tmp_path / "lora"))
    merged = ah.merge(tmp_path / "lora", base=base, out=tmp_path / "merged").path
    result = ah.extract(base, merged, out=tmp_path / "x", rank=4)
    assert {m.name: m.kind for m in result.modules} == {"conv_in": "conv", "proj": "conv", "head": "linear"}

    def deltas(adapter: Path) -> dict[str, torch.Tensor]:
        fresh = _ConvNet()
        fresh.load_state_dict(read_checkpoint(base))
        model = PeftModel.from_pretrained(fresh, str(adapter))
        with torch.no_grad():
            layers = {n: model.base_model.model.get_submodule(n) for n in ("conv_in", "proj")}
            return {n: layer.get_delta_weight("default") for n, layer in layers.items()}

    want, got = deltas(tmp_path / "lora"), deltas(result.path)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-7)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    fresh, merged_net = _ConvNet(), _ConvNet()
    fresh.load_state_dict(read_checkpoint(base))
    merged_net.load_state_dict(read_checkpoint(merged))
    with torch.no_grad():
        ours = PeftModel.from_pretrained(fresh, str(result.path))(x)
        torch.testing.assert_close(ours, merged_net(x), rtol=0, atol=1e-5)


def test_a_merged_lora_comes_back_from_a_bf16_base(llama_base, llama_lora, tmp_path):
    from safetensors.torch import save_file

    typed = tmp_path / "bf16"
    typed.mkdir()
    tensors = read_checkpoint(llama_base)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(typed / "model.safetensors"))
    (typed / "config.json").write_text((llama_base / "config.json").read_text())
    merged = ah.merge(llama_lora, base=typed, out=tmp_path / "merged").path
    result = ah.extract(typed, merged, out=tmp_path / "x", rank=8)
    want, got = _peft_deltas(llama_base, llama_lora), _peft_deltas(llama_base, result.path)
    merged_w = read_checkpoint(merged)
    for name, delta in want.items():
        # tuned = bf16(W + dW) = W + dW + E with |E| <= 2^-9 |W + dW| per entry; dW has rank 8, so the rank-8
        # truncation of dW + E is within 2 ||E||_F of dW
        bound = 2 * 2**-9 * float(merged_w[name + ".weight"].double().norm())
        assert float((got[name] - delta).norm()) <= bound, name
        assert float((got[name] - delta).norm()) < 0.05 * float(delta.norm())


def test_nan_in_the_tuned_weights_and_output_into_an_input_are_refused(llama_base, merged_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(merged_llama, tuned)
    (weights_file,) = tuned.glob("*.safetensors")
    weights = load_file(weights_file)
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = weights[key].clone()
    weights[key][0, 0] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ah.InvalidAdapterError, match=r"q_proj\.weight' holds NaN or inf"):
        ah.extract(llama_base, tuned, out=tmp_path / "x", rank=4)
    assert not (tmp_path / "x").exists()
    before = sorted(p.name for p in merged_llama.iterdir())
    with pytest.raises(ah.AdaptersError):
        ah.extract(llama_base, merged_llama, out=merged_llama, rank=4, overwrite=True)
    assert sorted(p.name for p in merged_llama.iterdir()) == before


def test_skipped_embeddings_are_still_hashed_and_still_refused_with_nan(llama_base, finetuned_llama, tmp_path):
    """--embeddings skip measures a changed embedding piece by piece, never loaded whole: the inputs it records are
    the same as with --embeddings save, and a NaN in it is refused as in any other changed tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    skipped = ah.extract(llama_base, finetuned_llama, out=tmp_path / "skip", rank=4)
    saved = ah.extract(llama_base, finetuned_llama, out=tmp_path / "save", rank=4, embeddings="save")
    recorded = [{i["role"]: i["sha256"] for i in ah.load(r.path).provenance.inputs} for r in (skipped, saved)]
    assert recorded[0] == recorded[1] and all(recorded[0].values())
    bad = tmp_path / "bad"
    shutil.copytree(finetuned_llama, bad)
    files = sorted(bad.glob("*.safetensors"))
    for f in files:
        weights = load_file(f)
        if "model.embed_tokens.weight" in weights:
            weights["model.embed_tokens.weight"][3, 3] = float("nan")
            save_file(weights, f, metadata={"format": "pt"})
    with pytest.raises(ah.InvalidAdapterError, match=r"embed_tokens\.weight' holds NaN or inf"):
        ah.extract(llama_base, bad, out=tmp_path / "never", rank=4)
    assert not (tmp_path / "never").exists()


def test_weights_stored_in_an_8_bit_float_are_named_not_called_unchanged(llama_base, merged_llama, tmp_path):
    """A tuned checkpoint whose targeted weights are float8 (raw 8-bit values: real fp8 checkpoints keep scales
    beside them) is not computed on: each such weight is named in a warning and left out, and when none is left the
    refusal says why instead of "no targeted weight differs"."""
    import shutil

    from safetensors.torch import load_file, save_file

    def with_fp8(leaves: tuple[str, ...], name: str) -> Path:
        tuned = tmp_path / name
        shutil.copytree(merged_llama, tuned)
        (weights_file,) = tuned.glob("*.safetensors")
        weights = load_file(weights_file)
        for k in weights:
            if k.endswith(leaves):
                weights[k] = weights[k].to(torch.float8_e4m3fn)
        save_file(weights, weights_file, metadata={"format": "pt"})
        return tuned

    result = ah.extract(llama_base, with_fp8(("q_proj.weight",), "q8"), out=tmp_path / "x", rank=8)
    modules = {row.name for row in result.modules}
    assert modules and all(m.endswith("v_proj") for m in modules)
    fp8_warnings = [w for w in result.warnings if "q_proj is stored as F32 in --base, F8_E4M3 in --tuned" in w]
    assert len(fp8_warnings) == len(modules)  # one per layer: as many as the v_proj modules extracted
    assert all("dequantize" in w for w in fp8_warnings)

    with pytest.raises(ah.InvalidAdapterError, match=r"stored in dtypes extract cannot compute with: .*F8_E4M3") as e:
        ah.extract(llama_base, with_fp8(("q_proj.weight", "v_proj.weight"), "qv8"), out=tmp_path / "y", rank=8)
    assert "no targeted weight differs" not in str(e.value)
    assert not (tmp_path / "y").exists()
