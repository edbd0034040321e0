"""``lora_ops.rank``: the factored SVD of ``dW = scale * B @ A`` against a dense float64 SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_ops import (
    CoreSVD,
    LoraFactors,
    LoraOpsError,
    ShapeMismatchError,
    core_svd,
    delta,
    energy_rank,
    singular_values,
)


def _factors(
    d_out: int, d_in: int, r: int, *, scale: float = 1.5, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
    b = torch.randn(d_out, r, generator=g) * 0.1
    return LoraFactors(A=a.to(dtype), B=b.to(dtype), scale=scale)


def _dense_svdvals(f: LoraFactors) -> torch.Tensor:
    return torch.linalg.svdvals(delta(f, dtype=torch.float64))


def _reconstruct(c: CoreSVD) -> torch.Tensor:
    return c.Q_b @ c.U @ torch.diag(c.S) @ c.Vh @ c.Q_a.T


def _rank_deficient(d_out: int, d_in: int, r: int, true_rank: int, *, seed: int = 0) -> LoraFactors:
    """r columns in B / rows in A, but B @ A has rank ``true_rank`` only (B's columns are combinations)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d_out, true_rank, generator=g, dtype=torch.float64) @ torch.randn(
        true_rank, r, generator=g, dtype=torch.float64
    )
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return LoraFactors(A=a, B=b, scale=0.25)


SHAPES = [(64, 64, 8), (32, 64, 8), (192, 64, 4), (64, 256, 16), (7, 5, 1), (96, 48, 48)]


# ------------------------------------------------------------------------ singular values


@pytest.mark.parametrize(("d_out", "d_in", "r"), SHAPES)
def test_singular_values_match_dense_svd(d_out: int, d_in: int, r: int) -> None:
    f = _factors(d_out, d_in, r, seed=d_out + d_in + r)
    s = singular_values(f)
    ref = _dense_svdvals(f)
    assert s.dtype == torch.float64
    assert s.shape == (r,)
    torch.testing.assert_close(s, ref[:r], rtol=1e-10, atol=1e-13 * float(ref[0]))
    assert bool((s[:-1] >= s[1:]).all()), "singular values must be descending"
    assert bool((s >= 0).all())


def test_singular_values_scale_linearly_and_sign_free() -> None:
    f = _factors(32, 48, 6)
    s = singular_values(f)
    s3 = singular_values(f._replace(scale=3 * f.scale))
    neg = singular_values(f._replace(scale=-f.scale))
    torch.testing.assert_close(s3, 3 * s, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(neg, s, rtol=1e-12, atol=0.0)


def test_singular_values_docstring_example() -> None:
    a = torch.eye(2, 5)
    b = torch.eye(3, 2) * 2
    assert singular_values(LoraFactors(a, b, 1.5)).tolist() == [3.0, 3.0]


@pytest.mark.parametrize(("r", "true_rank"), [(8, 3), (8, 1), (16, 5)])
def test_rank_deficient_factors(r: int, true_rank: int) -> None:
    f = _rank_deficient(40, 56, r, true_rank, seed=r * 10 + true_rank)
    s = singular_values(f)
    ref = _dense_svdvals(f)
    sigma1 = float(ref[0])
    assert s.shape == (r,)
    torch.testing.assert_close(s[:true_rank], ref[:true_rank], rtol=1e-9, atol=1e-12 * sigma1)
    assert float(s[true_rank - 1]) > 1e-3 * sigma1
    assert float(s[true_rank:].abs().max()) < 1e-10 * sigma1
    # all the energy sits in the first `true_rank` values
    assert energy_rank(s, 1.0) == true_rank
    # and the factored SVD still rebuilds the update exactly
    torch.testing.assert_close(_reconstruct(core_svd(f)), delta(f, dtype=torch.float64), rtol=0, atol=1e-12 * sigma1)


def test_rank_deficient_a() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 30, generator=g, dtype=torch.float64)
    a = torch.cat([a, a[:1] * 2, a[1:] - a[:1]])  # 4 rows spanning 2 dimensions
    b = torch.randn(20, 4, generator=g, dtype=torch.float64)
    f = LoraFactors(A=a, B=b, scale=0.5)
    s = singular_values(f)
    ref = _dense_svdvals(f)
    torch.testing.assert_close(s[:2], ref[:2], rtol=1e-9, atol=0.0)
    assert float(s[2:].abs().max()) < 1e-10 * float(ref[0])


def test_zero_b_gives_zero_spectrum() -> None:
    f = _factors(16, 24, 4)
    f = f._replace(B=torch.zeros_like(f.B))
    s = singular_values(f)
    assert s.tolist() == [0.0] * 4
    assert energy_rank(s, 0.9) is None
    assert energy_rank(s, 1.0) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    """Stored half-precision factors are upcast exactly; the SVD itself runs in float64."""
    f = _factors(48, 32, 8, dtype=dtype)
    s = singular_values(f)
    assert s.dtype == torch.float64
    ref = _dense_svdvals(f)  # delta() upcasts the same stored values to float64
    torch.testing.assert_close(s, ref[:8], rtol=1e-10, atol=1e-13 * float(ref[0]))


def test_small_singular_values_survive() -> None:
    """The thin-QR route keeps singular values far below the largest (a Gram-matrix shortcut would not)."""
    g = torch.Generator().manual_seed(11)
    qb, _ = torch.linalg.qr(torch.randn(64, 4, generator=g, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(80, 4, generator=g, dtype=torch.float64))
    want = torch.tensor([1.0, 1e-2, 1e-4, 1e-6], dtype=torch.float64)
    f = LoraFactors(A=(torch.diag(want) @ qa.T).float(), B=qb.float(), scale=1.0)
    s = singular_values(f)
    ref = _dense_svdvals(f)
    torch.testing.assert_close(s, ref[:4], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(s, want, rtol=1e-5, atol=0.0)


# ------------------------------------------------------------------------------ core_svd


@pytest.mark.parametrize(("d_out", "d_in", "r"), SHAPES)
def test_core_svd_reconstructs_delta(d_out: int, d_in: int, r: int) -> None:
    f = _factors(d_out, d_in, r, scale=2.0, seed=7 * r + d_in)
    c = core_svd(f)
    assert c.Q_b.shape == (d_out, r)
    assert c.U.shape == (r, r)
    assert c.S.shape == (r,)
    assert c.Vh.shape == (r, r)
    assert c.Q_a.shape == (d_in, r)
    assert all(t.dtype == torch.float64 for t in c)
    dense = delta(f, dtype=torch.float64)
    torch.testing.assert_close(_reconstruct(c), dense, rtol=0, atol=1e-12 * float(dense.abs().max()))
    # the dense update's SVD in factored form: (Q_b U) and (Q_a Vh^T) have orthonormal columns
    eye = torch.eye(r, dtype=torch.float64)
    left = c.Q_b @ c.U
    right = c.Q_a @ c.Vh.T
    torch.testing.assert_close(left.T @ left, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(right.T @ right, eye, rtol=0, atol=1e-12)


def test_core_svd_top_k_is_best_rank_k_approximation() -> None:
    """Truncating the factored SVD gives the Eckart-Young error: sqrt(sum of the dropped sigma^2)."""
    f = _factors(50, 70, 10, seed=5)
    c = core_svd(f)
    dense = delta(f, dtype=torch.float64)
    for k in (1, 3, 7):
        approx = (c.Q_b @ c.U[:, :k]) @ torch.diag(c.S[:k]) @ (c.Vh[:k] @ c.Q_a.T)
        err = float(torch.linalg.matrix_norm(dense - approx, ord="fro"))
        assert err == pytest.approx(float(c.S[k:].square().sum().sqrt()), rel=1e-9)


def test_rank_above_matrix_side() -> None:
    """r larger than d_out (a degenerate but loadable adapter): values match and the factors still multiply out."""
    g = torch.Generator().manual_seed(2)
    f = LoraFactors(
        A=torch.randn(8, 16, generator=g, dtype=torch.float64),
        B=torch.randn(4, 8, generator=g, dtype=torch.float64),
        scale=0.5,
    )
    ref = _dense_svdvals(f)  # 4 values: dW is 4 x 16
    s = singular_values(f)
    assert 4 <= s.shape[0] <= 8
    torch.testing.assert_close(s[:4], ref, rtol=1e-10, atol=0.0)
    assert s[4:].abs().sum().item() < 1e-10  # padding, if any, is zero
    c = core_svd(f)
    torch.testing.assert_close(_reconstruct(c), delta(f, dtype=torch.float64), rtol=0, atol=1e-12)


def test_core_svd_rejects_mismatched_factors() -> None:
    with pytest.raises(ShapeMismatchError, match="rank mismatch"):
        core_svd(LoraFactors(A=torch.zeros(4, 16), B=torch.zeros(8, 3), scale=1.0))
    with pytest.raises(ShapeMismatchError, match="matrices"):
        singular_values(LoraFactors(A=torch.zeros(4, 16, 1), B=torch.zeros(8, 4), scale=1.0))
    assert issubclass(ShapeMismatchError, LoraOpsError)


def test_core_svd_does_not_touch_inputs() -> None:
    f = _factors(16, 24, 4)
    a, b = f.A.clone(), f.B.clone()
    core_svd(f)
    assert torch.equal(f.A, a) and torch.equal(f.B, b)
    assert f.A.dtype == torch.float32


# ----------------------------------------------------------------------------- energy_rank


def _np_energy_rank(s: np.ndarray, energy: float) -> int:
    e = s.astype(np.float64) ** 2
    return int(np.argmax(np.cumsum(e) / e.sum() >= energy)) + 1


def test_energy_rank_docstring_and_boundaries() -> None:
    assert energy_rank(torch.tensor([3.0, 1.0]), 0.9) == 1  # 9 / 10 reaches 0.9 exactly
    assert energy_rank(torch.tensor([3.0, 1.0]), 0.91) == 2
    assert energy_rank(torch.tensor([3.0, 1.0]), 1e-9) == 1


def test_energy_rank_full_energy_counts_nonzero_values() -> None:
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == 4
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]), 1.0) == 3
    assert energy_rank(torch.tensor([5.0]), 1.0) == 1
    # values whose cumulative sum rounds just below 1.0 still reach full energy
    s = torch.full((10,), 0.1, dtype=torch.float64).sqrt()
    assert energy_rank(s, 1.0) == 10


def test_energy_rank_matches_numpy_on_random_spectra() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(12, generator=g, dtype=torch.float64).sort(descending=True).values ** 3
        for energy in (0.5, 0.9, 0.99):
            assert energy_rank(s, energy) == _np_energy_rank(s.numpy(), energy)


def test_energy_rank_zero_and_empty_spectrum_is_none() -> None:
    assert energy_rank(torch.zeros(4), 0.9) is None
    assert energy_rank(torch.zeros(0), 0.5) is None


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.0000001, 1.5, float("nan")])
def test_energy_rank_rejects_bad_energy(energy: float) -> None:
    with pytest.raises(LoraOpsError, match="energy must be in"):
        energy_rank(torch.tensor([1.0, 0.5]), energy)


@pytest.mark.parametrize("where", ["A", "B", "scale"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decompositions_refuse_non_finite_updates(where, bad):
    from lora_ops import NonFiniteError, core_svd, reduce_rank

    torch.manual_seed(0)
    a, b, scale = torch.randn(4, 16), torch.randn(8, 4), 0.5
    if where == "A":
        a[1, 2] = bad
    elif where == "B":
        b[3, 0] = bad
    else:
        scale = bad
    f = LoraFactors(a, b, scale)
    for op in (core_svd, singular_values, lambda f: reduce_rank(f, rank=2)):
        with pytest.raises(NonFiniteError, match="NaN or inf"):
            op(f)
