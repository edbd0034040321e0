"""Merging Conv2d LoRA (1x1 and 3x3 kernels, as kohya / diffusion LoRAs carry) bit-identical to PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_models import randomize_adapter_weights
from peft import LoraConfig, get_peft_model
from peft_helpers import read_checkpoint
from safetensors.torch import save_file

import adapterhub_cli as ah


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.proj = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.conv_in(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def conv_case(tmp_path_factory):
    return build_conv_case(tmp_path_factory.mktemp("conv"))


def build_conv_case(root, *, use_dora=False):
    """(base folder, PEFT adapter folder): a seeded TinyConvNet and a LoRA (DoRA with ``use_dora``) on its 3x3
    conv, 1x1 conv and head."""
    torch.manual_seed(0)
    model = TinyConvNet()
    base = root / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"architectures": ["TinyConvNet"]}))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["conv_in", "proj", "head"], use_dora=use_dora)
    )
    randomize_adapter_weights(peft_model, seed=1, scale=0.1)
    adapter = root / "adapter"
    peft_model.save_pretrained(str(adapter))
    return base, adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_merge_equals_peft(conv_case, dtype, tmp_path):
    from peft import PeftModel

    base, adapter = conv_case
    typed = tmp_path / "typed"
    typed.mkdir()
    tensors = read_checkpoint(base)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(typed / "model.safetensors"))
    (typed / "config.json").write_text((base / "config.json").read_text())
    model = TinyConvNet().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    reference = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    result = ah.merge(adapter, base=typed, out=tmp_path / "ours")
    ours = read_checkpoint(result.path)
    assert result.tensors_merged == 3 and set(ours) == set(reference)
    for key, want in reference.items():
        assert ours[key].dtype == want.dtype and torch.equal(ours[key], want), key


def test_conv_unmerge_gives_the_base_back(conv_case, tmp_path):
    base, adapter = conv_case
    merged = ah.merge(adapter, base=base, out=tmp_path / "m").path
    back = read_checkpoint(ah.unmerge(adapter, merged=merged, out=tmp_path / "b").path)
    for key, want in read_checkpoint(base).items():
        torch.testing.assert_close(back[key], want, rtol=0, atol=1e-6)


def test_reduce_conv_lora_reaches_the_dense_optimum_and_peft_loads_it(conv_case, tmp_path):
    from peft import PeftModel

    base, adapter = conv_case
    result = ah.reduce(adapter, tmp_path / "r2", rank=2)
    original, reduced = ah.load(adapter), ah.load(result.path)
    model = TinyConvNet()
    model.load_state_dict(read_checkpoint(base))
    PeftModel.from_pretrained(model, str(result.path))  # shapes fit PEFT's conv layers
    for m in result.modules:
        f, g = original.factors(m.name), reduced.factors(m.name)
        dense = f.scale * (f.B.double() @ f.A.double())
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = g.scale * (g.B.double() @ g.A.double())
        assert torch.linalg.norm(got - best) <= 1e-5 * torch.linalg.norm(dense)
        assert reduced.modules[m.name].A.shape[1:] == original.modules[m.name].A.shape[1:]


def test_combine_conv_loras_cat_is_exact(conv_case, tmp_path):
    base, adapter = conv_case
    half = ah.reduce(adapter, tmp_path / "half", rank=2).path
    result = ah.combine([adapter, half], tmp_path / "c", weights=[1.0, -0.5], method="cat")
    combined, a, b = ah.load(result.path), ah.load(adapter), ah.load(half)
    for name in combined.modules:
        want = sum(
            w * (f.scale * (f.B.double() @ f.A.double())) for w, f in ((1.0, a.factors(name)), (-0.5, b.factors(name)))
        )
        g = combined.factors(name)
        torch.testing.assert_close(g.scale * (g.B.double() @ g.A.double()), want, rtol=1e-5, atol=1e-6)
        assert combined.modules[name].A.shape[1:] == a.modules[name].A.shape[1:]
    merged = ah.merge(result.path, base=base, out=tmp_path / "m")  # the conv output loads and merges
    assert merged.tensors_merged == 3
