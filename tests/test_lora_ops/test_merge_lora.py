"""`lora_ops.merge_lora`: the blocked, in-place merge equals PEFT's whole-tensor arithmetic bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from lora_ops import merge_lora


def peft_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's ``W += transpose(B @ A, fan_in_fan_out) * scale`` on a copy of ``w``."""
    out = w.clone()
    delta = b @ a
    out += (delta.T if fan_in_fan_out else delta) * scale
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [2.0, 0.5, 4.0, -1.0, 1.7, 0.25 * 3, 1.0])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("d_out", [700, 257])
def test_blocked_merge_equals_whole_tensor_merge(dtype, scale, fan_in_fan_out, d_out):
    g = torch.Generator().manual_seed(11)
    # blocks of 256 leave a remainder; a 1-row product would take another BLAS path and sum in another order
    d_in, r = 300, 16
    a = torch.randn(r, d_in, generator=g) * 0.02
    b = torch.randn(d_out, r, generator=g) * 0.02
    w = torch.randn((d_in, d_out) if fan_in_fan_out else (d_out, d_in), generator=g).to(dtype)
    want = peft_merge(w, a, b, scale, fan_in_fan_out)
    for rows in (1, 64, 100, 256, 1000):
        assert torch.equal(merge_lora(w, a, b, scale, fan_in_fan_out=fan_in_fan_out, rows=rows), want)
    in_place = w.clone()
    assert merge_lora(in_place, a, b, scale, fan_in_fan_out=fan_in_fan_out, out=in_place) is in_place
    assert torch.equal(in_place, want)


@pytest.mark.parametrize("n", [64, 257, 513, 700, 1025])
def test_row_blocks_cover_the_rows_without_thin_blocks(n):
    from lora_ops.merge import MIN_ROWS, row_blocks

    for rows in (1, 64, 256):
        blocks = row_blocks(n, rows)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(blocks))
        assert min(j - i for i, j in blocks) >= min(n, max(rows, MIN_ROWS))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_block_sums_cover_every_row_and_reveal_nan_and_overflow(fan_in_fan_out):
    from lora_ops.merge import row_blocks

    g = torch.Generator().manual_seed(5)
    d_out, d_in, r = 700, 300, 8
    a = torch.randn(r, d_in, generator=g) * 0.02
    b = torch.randn(d_out, r, generator=g) * 0.02
    w = torch.randn((d_in, d_out) if fan_in_fan_out else (d_out, d_in), generator=g).to(torch.bfloat16)
    sums: list[float] = []
    got = merge_lora(w, a, b, 2.0, fan_in_fan_out=fan_in_fan_out, rows=64, sums=sums)
    blocks = row_blocks(w.shape[0], 64)
    assert len(sums) == len(blocks)
    assert sums == pytest.approx([float(got[i:j].sum()) for i, j in blocks], rel=1e-2)
    # a NaN in the last row of the weight, or an update that overflows bf16 in the first row, shows in a sum
    poisoned = w.clone()
    poisoned[-1, -1] = float("nan")
    sums = []
    merge_lora(poisoned, a, b, 2.0, fan_in_fan_out=fan_in_fan_out, rows=64, sums=sums)
    assert any(s != s for s in sums)
    huge = b.clone()
    huge[0] = 1e30
    sums = []
    out = merge_lora(w, a, huge, 1e10, fan_in_fan_out=fan_in_fan_out, rows=64, sums=sums)
    assert not torch.isfinite(out).all()
    assert not all(abs(s) < float("inf") for s in sums)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_nan_and_inf_come_out_with_the_same_bits_as_peft(dtype, fan_in_fan_out):
    """NaN payloads and infinities in the weight pass through the blocked add exactly as through PEFT's."""
    g = torch.Generator().manual_seed(3)
    d_out, d_in, r = 300, 200, 4
    a = torch.randn(r, d_in, generator=g) * 0.02
    b = torch.randn(d_out, r, generator=g) * 0.02
    w = torch.randn((d_in, d_out) if fan_in_fan_out else (d_out, d_in), generator=g).to(dtype)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), -float("nan")
    want = peft_merge(w, a, b, 2.0, fan_in_fan_out).view(torch.int16)
    got = merge_lora(w, a, b, 2.0, fan_in_fan_out=fan_in_fan_out, rows=64).view(torch.int16)
    assert torch.equal(got, want)
