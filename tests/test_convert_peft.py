"""convert --to peft keeps everything a PEFT adapter holds: modules_to_save copies and lora_B biases."""

from __future__ import annotations

import torch
from peft import PeftModel

import adapterhub_cli as ah


def test_convert_to_peft_keeps_modules_to_save(roberta_lora, tmp_path):
    a = ah.load(roberta_lora)
    assert a.extra_tensors  # the classifier head copies
    out = ah.convert(roberta_lora, tmp_path / "out", to="peft").path
    b = ah.load(out)
    assert set(b.extra_tensors) == set(a.extra_tensors)
    for key, info in a.extra_tensors.items():
        assert torch.equal(b.tensor(b.extra_tensors[key].name), a.tensor(info.name))
    for name, m in a.modules.items():
        assert torch.equal(b.tensor(b.modules[name].A.name), a.tensor(m.A.name))


def test_convert_to_peft_keeps_lora_bias(tmp_path):
    from fixtures_models import build_named_base, load_base_model
    from peft import LoraConfig, get_peft_model

    base = build_named_base("roberta_base", tmp_path / "base")
    model = load_base_model(base, "seq-cls")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(tmp_path / "lora")
    out = ah.convert(tmp_path / "lora", tmp_path / "out", to="peft").path
    a, b = ah.load(tmp_path / "lora"), ah.load(out)
    assert all(m.bias is not None for m in b.modules.values())
    for name, m in a.modules.items():
        assert torch.equal(b.tensor(b.modules[name].bias.name), a.tensor(m.bias.name))
    reloaded = PeftModel.from_pretrained(load_base_model(base, "seq-cls"), out)  # PEFT loads what we wrote
    biases = {n: p for n, p in reloaded.named_parameters() if n.endswith("lora_B.default.bias")}
    assert biases and all(bool(p.abs().sum() > 0) for p in biases.values())
