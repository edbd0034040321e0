"""`--device cuda`: the merge computed on the GPU (skipped without one).

On a CUDA device PEFT computes ``W += (B @ A) * scale`` with cuBLAS on the whole weight; the engine does the same
per tensor, so its output is bit-identical to PEFT's ``merge_and_unload`` run on that device. Against the CPU
merge the two BLAS libraries sum in other orders: results may differ by one rounding of the dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from peft_helpers import FITTING_ADAPTERS, load_base, read_checkpoint

import adapterhub_cli as ah


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peft_merged_on_cuda(base, adapter, task: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload`` with the model on the GPU; the state dict back on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base, task, dtype).to("cuda"), str(adapter))
        merged = model.merge_and_unload()
    return {k: v.detach().cpu() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("adapter_name", list(FITTING_ADAPTERS))
def test_cuda_merge_is_bit_identical_to_peft_on_cuda(adapter_name, dtype, request, tmp_path):
    base_name, task = FITTING_ADAPTERS[adapter_name]
    adapter, base = request.getfixturevalue(adapter_name), request.getfixturevalue(base_name)
    typed = tmp_path / "base"
    load_base(base, task, DTYPES[dtype]).save_pretrained(typed)
    ours = read_checkpoint(ah.merge(adapter, base=typed, out=tmp_path / "gpu", device="cuda").path)
    theirs = peft_merged_on_cuda(typed, adapter, task, DTYPES[dtype])
    changed = 0
    for key, got in ours.items():
        if key not in theirs:  # a tied head transformers leaves out of its state dict under another name
            continue
        want = theirs[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), f"{key}: max |diff| {(got.double() - want.double()).abs().max()}"
        changed += 1
    assert changed


def test_cuda_merge_matches_cpu_within_one_rounding(llama_all_linear, llama_base, tmp_path):
    cpu = read_checkpoint(ah.merge(llama_all_linear, base=llama_base, out=tmp_path / "cpu").path)
    gpu = read_checkpoint(ah.merge(llama_all_linear, base=llama_base, out=tmp_path / "gpu", device="cuda").path)
    assert set(cpu) == set(gpu)
    for key, want in cpu.items():
        got = gpu[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        # cuBLAS sums in another order than the CPU BLAS: the results may differ by one rounding of the dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-6, atol=1e-7)


def test_cuda_unmerge_gives_base_back(llama_lora, llama_base, tmp_path):
    merged = ah.merge(llama_lora, base=llama_base, out=tmp_path / "merged", device="cuda").path
    back = read_checkpoint(ah.unmerge(llama_lora, merged=merged, out=tmp_path / "back", device="cuda").path)
    base = read_checkpoint(llama_base)
    for key, want in base.items():
        torch.testing.assert_close(back[key], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_conv_merge_is_bit_identical_to_peft_on_cuda(dtype, tmp_path):
    """Conv2d LoRA (3x3 and 1x1) and a Linear one, merged on the GPU, as PEFT merges them there."""
    from safetensors.torch import save_file
    from test_merge_conv import TinyConvNet, build_conv_case

    (tmp_path / "case").mkdir()
    base, adapter = build_conv_case(tmp_path / "case")
    tensors = read_checkpoint(base)
    typed = tmp_path / "typed"
    typed.mkdir()
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(typed / "model.safetensors"))
    (typed / "config.json").write_text((base / "config.json").read_text())
    model = TinyConvNet().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    merged = PeftModel.from_pretrained(model.to("cuda"), str(adapter)).merge_and_unload()
    reference = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    ours = read_checkpoint(ah.merge(adapter, base=typed, out=tmp_path / "ours", device="cuda").path)
    assert set(ours) == set(reference)
    for key, want in reference.items():
        assert ours[key].dtype == want.dtype and torch.equal(ours[key], want), key
