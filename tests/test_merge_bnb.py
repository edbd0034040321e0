"""Merging into bitsandbytes checkpoints (nf4 / int8 saved by transformers) and writing merged models quantized."""

from __future__ import annotations

import json
import warnings

import pytest
import torch


pytest.importorskip("bitsandbytes")

from bnb_fixtures import build_tiny_llama, load_quantized
from fixtures_models import randomize_adapter_weights
from peft_helpers import read_checkpoint

import adapterhub_cli as ah
from adapterhub_cli.artifact.checkpoint import open_base
from adapterhub_cli.merge import bnb


@pytest.fixture(scope="session")
def bnb_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bnb_merge")


@pytest.fixture(scope="session")
def bf16_base(bnb_root):
    return build_tiny_llama(bnb_root / "bf16")


def _saved_quantized(bnb_root, bf16_base, scheme: str):
    """The bf16 tiny Llama loaded by transformers with bitsandbytes ``scheme`` and saved (as users get them)."""
    out = bnb_root / scheme
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_quantized(bf16_base, scheme).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def nf4_base(bnb_root, bf16_base):
    return _saved_quantized(bnb_root, bf16_base, "nf4")


@pytest.fixture(scope="session")
def int8_base(bnb_root, bf16_base):
    return _saved_quantized(bnb_root, bf16_base, "int8")


@pytest.fixture(scope="session")
def tiny_lora(bnb_root, bf16_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_adapter_weights(peft_model, seed=5, scale=0.05)
    out = bnb_root / "lora"
    peft_model.save_pretrained(str(out))
    return out


def _reference_merge(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """Dequantize each weight the way bitsandbytes does, then PEFT's update, in the weight's 16-bit dtype."""
    from lora_ops import lora_delta, merge_delta

    stored = open_base(base_dir)
    view = bnb.logical_view(stored) if bnb.bnb_scheme(stored.config) else stored
    comps = bnb.companions(stored) if bnb.bnb_scheme(stored.config) else {}
    raw = read_checkpoint(base_dir)
    adapter = ah.load(adapter_dir)
    out = {}
    for key, info in view.tensors.items():
        w = bnb.dequantize_weight(raw.__getitem__, key, stored) if key in comps else raw[key]
        module = key.removesuffix(".weight")
        if module in adapter.modules:
            f = adapter.factors(module)
            w = merge_delta(w, lora_delta(f.A, f.B, f.scale))
        out[key] = w
        assert tuple(w.shape) == info.shape
    return out


@pytest.mark.parametrize("base_name", ["nf4_base", "int8_base"])
def test_merge_into_quantized_base_writes_16_bit(base_name, request, tiny_lora, tmp_path):
    base = request.getfixturevalue(base_name)
    result = ah.merge(tiny_lora, base=base, out=tmp_path / "out")
    assert result.tensors_merged == 6
    got = read_checkpoint(result.path)
    want = _reference_merge(base, tiny_lora)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    cfg = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.path)  # a plain 16-bit checkpoint


def test_rounding_error_of_a_quantized_base_is_reported_by_comparison(nf4_base, bf16_base, tiny_lora, tmp_path):
    """Merging into the nf4 base vs into the original bf16 weights: the difference is the base's own nf4 error."""
    from_nf4 = read_checkpoint(ah.merge(tiny_lora, base=nf4_base, out=tmp_path / "a").path)
    from_bf16 = read_checkpoint(ah.merge(tiny_lora, base=bf16_base, out=tmp_path / "b").path)
    errors = [
        float((from_nf4[k].float() - from_bf16[k].float()).norm() / from_bf16[k].float().norm())
        for k in from_bf16
        if k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight"))
    ]
    assert 0.05 < max(errors) < 0.15  # nf4's ~9% relative error on normal weights, not something we add


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_output_loads_with_transformers(scheme, bf16_base, tiny_lora, tmp_path):
    from transformers import AutoModelForCausalLM

    result = ah.merge(tiny_lora, base=bf16_base, out=tmp_path / scheme, quantize=scheme)
    cfg = json.loads((result.path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(result.path, device_map="cpu")
    merged16 = read_checkpoint(ah.merge(tiny_lora, base=bf16_base, out=tmp_path / "plain").path)
    stored = open_base(result.path)
    raw = read_checkpoint(result.path)
    for key in bnb.companions(stored):
        deq = bnb.dequantize_weight(raw.__getitem__, key, stored).float()
        want = merged16[key].float()
        bound = 0.15 if scheme == "nf4" else 0.01
        assert float((deq - want).norm() / want.norm()) < bound, key
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ in ("Linear4bit", "Linear8bitLt")


def test_quantized_base_to_quantized_output(nf4_base, tiny_lora, tmp_path):
    result = ah.merge(tiny_lora, base=nf4_base, out=tmp_path / "q", quantize="nf4")
    assert set(bnb.companions(open_base(result.path))) == set(bnb.companions(open_base(nf4_base)))


def test_conv1d_models_are_refused_for_bitsandbytes(gpt2_lora, gpt2_base, tmp_path):
    with pytest.raises(ah.UsageError, match="Conv1D"):
        ah.merge(gpt2_lora, base=gpt2_base, out=tmp_path / "x", quantize="nf4")
    assert not (tmp_path / "x").exists()
