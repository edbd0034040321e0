"""`--device cuda`: the same merge computed on the GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import read_checkpoint

import adapterhub_cli as ah


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_merge_matches_cpu_within_one_rounding(llama_all_linear, llama_base, tmp_path):
    cpu = read_checkpoint(ah.merge(llama_all_linear, base=llama_base, out=tmp_path / "cpu").path)
    gpu = read_checkpoint(ah.merge(llama_all_linear, base=llama_base, out=tmp_path / "gpu", device="cuda").path)
    assert set(cpu) == set(gpu)
    for key, want in cpu.items():
        got = gpu[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        # cuBLAS sums in another order than the CPU BLAS: the results may differ by one rounding of the dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-6, atol=1e-7)
