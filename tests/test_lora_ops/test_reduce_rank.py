"""reduce_rank against a dense float64 truncated SVD, on well-conditioned, rank-deficient and wide factors."""

from __future__ import annotations

import math

import pytest
import torch

from lora_ops import LoraFactors, LoraOpsError, choose_rank, reduce_rank


def _case(kind: str) -> LoraFactors:
    g = torch.Generator().manual_seed({"plain": 0, "deficient": 1, "wide": 2, "zero": 3}[kind])
    if kind == "wide":  # r larger than d_out: R of B is not square
        return LoraFactors(torch.randn(12, 40, generator=g), torch.randn(6, 12, generator=g), 0.5)
    a, b = torch.randn(8, 48, generator=g), torch.randn(32, 8, generator=g)
    if kind == "deficient":
        b[:, 3] = 0  # an untrained column
        b[:, 5] = b[:, 1]  # and a repeated one
    if kind == "zero":
        b = torch.zeros_like(b)
    return LoraFactors(a, b, 2.0)


@pytest.mark.parametrize("kind", ["plain", "deficient", "wide", "zero"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_dense_truncated_svd(kind, k):
    f = _case(kind)
    dense = f.scale * (f.B.double() @ f.A.double())
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    red = reduce_rank(f, rank=k, scale=lambda kk: 4.0 / kk, dtype=torch.float64)
    assert red.rank == min(k, f.rank, *f.shape)
    assert red.factors.scale == 4.0 / red.rank
    got = red.factors.scale * (red.factors.B @ red.factors.A)
    total = float(s.square().sum())
    tol = 1e-10 * max(math.sqrt(total), 1e-30)
    assert float((got - best).norm()) <= tol or total == 0.0
    if total:
        assert red.rel_error == pytest.approx(float(s[k:].square().sum().sqrt()) / math.sqrt(total), abs=1e-12)
    else:
        assert red.rel_error == 0.0 and red.retained_energy == 1.0 and float(got.abs().max()) == 0.0


def test_rules_are_exclusive():
    with pytest.raises(LoraOpsError, match="exactly one"):
        choose_rank(torch.tensor([1.0]), rank=1, energy=0.5)
    with pytest.raises(LoraOpsError):
        choose_rank(torch.tensor([1.0]), sv_ratio=0.5)
    assert choose_rank(torch.tensor([4.0, 2.0, 1.0]), sv_fro=0.9) == 2  # 0.9² = 81% of the energy: 16+4 of 21
    assert choose_rank(torch.tensor([4.0, 2.0, 1.0]), energy=0.99, max_rank=2) == 2
