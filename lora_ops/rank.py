"""Spectra of LoRA updates from their factors: thin QR of B and Aᵀ, then the SVD of the r x r core.

For ``dW = s B A`` with ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a``, ``dW = Q_b (s R_b R_aᵀ) Q_aᵀ``; the
orthonormal outer factors do not change singular values, so the spectrum of ``dW`` is the spectrum
of the r x r core. Cost ``O((d_out + d_in) r²)`` instead of a dense SVD's ``O(d_out d_in min(d_out, d_in))``.
The QR runs in float64: the Gram-matrix shortcut loses singular values below ~5e-4·σ₁ in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from lora_ops.errors import LoraOpsError, NonFiniteError
from lora_ops.factors import LoraFactors, check_factors


class CoreSVD(NamedTuple):
    """Factored SVD of ``dW = scale * B @ A``: ``dW = (Q_b U) diag(S) (Q_a V)ᵀ``.

    Attributes:
        Q_b: (d_out, r) orthonormal columns.
        U: (r, r) left singular vectors of the core.
        S: (r,) singular values of dW, descending (float64).
        Vh: (r, r) right singular vectors of the core, transposed.
        Q_a: (d_in, r) orthonormal columns.

    In the degenerate case r > min(d_out, d_in), r above is replaced by r_b = min(d_out, r) for Q_b, r_a =
    min(d_in, r) for Q_a, and k = min(r_b, r_a) for S; U is (r_b, k) and Vh (k, r_a).
    """

    Q_b: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    Q_a: torch.Tensor


def _finite(core: torch.Tensor) -> torch.Tensor:
    """``core`` (r, r) itself, or :class:`NonFiniteError`: NaN / inf in A, B or the scale reach the r x r core, and
    LAPACK would fail on it with an unhelpful error (or loop)."""
    if not bool(torch.isfinite(core).all()):
        raise NonFiniteError("the update holds NaN or inf (in its factors or its scale)")
    return core


def core_svd(f: LoraFactors) -> CoreSVD:
    """SVD of ``scale * B @ A`` through thin QR of B (d_out, r) and Aᵀ (d_in, r) and an r x r SVD, in float64.

    Example:
        >>> f = LoraFactors(torch.randn(4, 32), torch.randn(16, 4), 0.5)
        >>> core_svd(f).S.shape
        torch.Size([4])
    """
    check_factors(f)
    q_b, r_b = torch.linalg.qr(f.B.detach().to(torch.float64), mode="reduced")
    q_a, r_a = torch.linalg.qr(f.A.detach().to(torch.float64).T, mode="reduced")
    core = _finite(float(f.scale) * (r_b @ r_a.T))
    # reduced SVD: when r exceeds d_out or d_in the core is not square and a full SVD's U / Vh would not
    # multiply out with diag(S)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return CoreSVD(Q_b=q_b, U=u, S=s, Vh=vh, Q_a=q_a)


def singular_values(f: LoraFactors) -> torch.Tensor:
    """Singular values (r,) of ``scale * B @ A``, descending, float64, without forming the dense matrix.

    Example:
        >>> A = torch.eye(2, 5); B = torch.eye(3, 2) * 2
        >>> singular_values(LoraFactors(A, B, 1.5)).tolist()
        [3.0, 3.0]
    """
    return core_svd(f).S


def energy_rank(s: torch.Tensor, energy: float) -> int | None:
    """Smallest k whose top-k singular values hold at least ``energy`` of ``sum(s**2)``.

    Args:
        s: (r,) singular values, descending.
        energy: fraction in (0, 1].

    Returns:
        k in 1..r, or None when the update is zero (the rank is undefined).

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0]), 0.9)
        1
    """
    if not 0.0 < energy <= 1.0:
        raise LoraOpsError(f"energy must be in (0, 1], got {energy}")
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return None
    cum = torch.cumsum(e, 0) / total
    # a tiny tolerance so that energy=1.0 is reached despite rounding in the cumulative sum
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


class ReducedLora(NamedTuple):
    """Result of :func:`reduce_rank`.

    Attributes:
        factors: A (k, d_in), B (d_out, k) and the requested output scale.
        rank: k, the number of singular values kept.
        singular_values: (r,) all singular values of the input update, descending, float64.
        retained_energy: ``sum(S[:k]²) / sum(S²)`` (1.0 for a zero update).
        rel_error: ``||dW - dW_k||_F / ||dW||_F`` (0.0 for a zero update); by Eckart-Young the optimum.
    """

    factors: LoraFactors
    rank: int
    singular_values: torch.Tensor
    retained_energy: float
    rel_error: float


def choose_rank(
    s: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
) -> int:
    """How many singular values to keep, by exactly one rule, capped by ``max_rank`` and len(s), at least 1.

    Rules:
        rank: keep ``rank``.
        energy: the fewest whose squares hold at least ``energy`` of ``sum(s²)`` (``||dW||_F²``).
        sv_ratio: every singular value at least ``s[0] / sv_ratio`` (kohya's rule, without its extra +1).
        sv_fro: the fewest whose norm is at least ``sv_fro`` of ``||dW||_F``; that is energy ``sv_fro²``
            (0.9 keeps 81% of the energy).

    Example:
        >>> choose_rank(torch.tensor([4.0, 2.0, 1.0]), sv_ratio=2.0)
        2
    """
    given = [x is not None for x in (rank, energy, sv_ratio, sv_fro)]
    if sum(given) != 1:
        raise LoraOpsError("give exactly one of rank, energy, sv_ratio, sv_fro")
    r = int(s.numel())
    if rank is not None:
        if rank < 1:
            raise LoraOpsError(f"rank must be at least 1, got {rank}")
        k = rank
    elif energy is not None:
        k = energy_rank(s, energy) or 1
    elif sv_fro is not None:
        if not 0.0 < sv_fro <= 1.0:
            raise LoraOpsError(f"sv_fro must be in (0, 1], got {sv_fro}")
        k = energy_rank(s, sv_fro**2) or 1
    else:
        assert sv_ratio is not None
        if sv_ratio < 1.0:
            raise LoraOpsError(f"sv_ratio must be at least 1, got {sv_ratio}")
        k = int((s >= s[0] / sv_ratio).sum()) if r and float(s[0]) > 0 else 1
    if max_rank is not None:
        if max_rank < 1:
            raise LoraOpsError(f"max_rank must be at least 1, got {max_rank}")
        k = min(k, max_rank)
    return max(1, min(k, r))


def _well_conditioned(r: torch.Tensor) -> bool:
    """Whether the triangular factor R (r x r) is safely invertible (|diag| ratio above 1e-8, in float64)."""
    if r.shape[0] != r.shape[1]:
        return False
    d = r.diagonal().abs()
    return d.numel() > 0 and float(d.min()) > 1e-8 * float(d.max())


def reduce_rank(
    f: LoraFactors,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    scale: float | Callable[[int], float] | None = None,
    dtype: torch.dtype | None = None,
) -> ReducedLora:
    """The optimal rank-k approximation of ``scale * B @ A`` in factor form (thin QR + r x r SVD, float64).

    ``B' = Q_b U_k diag(sqrt(S_k / s'))`` and ``A' = diag(sqrt(S_k / s')) V_kᵀ Q_aᵀ``, so that
    ``s' B' A' = Q_b U_k S_k V_kᵀ Q_aᵀ``, the truncated SVD of the update (Eckart-Young), at
    ``O((d_out + d_in) r²)`` cost. k is chosen by :func:`choose_rank`.

    Args:
        f: A (r, d_in), B (d_out, r), scale.
        scale: the output scale s' (finite, non-zero; a negative one, from a negative lora_alpha, is kept and
            B' takes its sign), or a function of k (e.g. ``lambda k: alpha / k`` for PEFT's rule); default: keep
            ``f.scale``.
        dtype: output dtype (default: A's dtype).

    Example:
        >>> f = LoraFactors(torch.randn(8, 64), torch.randn(32, 8), 2.0)
        >>> red = reduce_rank(f, rank=4, scale=lambda k: 16 / k)
        >>> red.factors.A.shape, red.factors.B.shape, red.factors.scale
        (torch.Size([4, 64]), torch.Size([32, 4]), 4.0)
    """
    check_factors(f)
    b64, a64 = f.B.detach().to(torch.float64), f.A.detach().to(torch.float64)
    r_b = torch.linalg.qr(b64, mode="r").R
    r_a = torch.linalg.qr(a64.T, mode="r").R
    u, s, vh = torch.linalg.svd(_finite(float(f.scale) * (r_b @ r_a.T)), full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
    out_scale = float(f.scale if scale is None else scale(k) if callable(scale) else scale)
    if not (math.isfinite(out_scale) and out_scale != 0):
        raise LoraOpsError(f"the output scale must be finite and non-zero, got {out_scale}")
    root = (s[:k] / abs(out_scale)).sqrt()  # a negative scale (a negative lora_alpha) flips B's sign instead
    sign = 1.0 if out_scale > 0 else -1.0
    if _well_conditioned(r_b) and _well_conditioned(r_a):
        # Q_b = B R_b⁻¹ and Q_aᵀ = R_a⁻ᵀ A: two r x k triangular solves replace forming Q_b and Q_a
        B = b64 @ torch.linalg.solve_triangular(r_b, u[:, :k] * (sign * root), upper=True)
        A = torch.linalg.solve_triangular(r_a, (root[:, None] * vh[:k]).T, upper=True).T @ a64
    else:  # rank-deficient B or A: R is singular, form the orthonormal factors explicitly
        c = core_svd(f)
        u, s, vh = c.U, c.S, c.Vh
        B = (c.Q_b @ u[:, :k]) * (sign * root)
        A = root[:, None] * (vh[:k] @ c.Q_a.T)
    out_dtype = dtype or f.A.dtype
    e = s.square()
    total = float(e.sum())
    kept = float(e[:k].sum())
    retained = 1.0 if total == 0.0 else kept / total
    rel_error = 0.0 if total == 0.0 else float(e[k:].sum().sqrt()) / total**0.5
    return ReducedLora(
        factors=LoraFactors(A=A.to(out_dtype), B=B.to(out_dtype), scale=out_scale),
        rank=k,
        singular_values=s,
        retained_energy=retained,
        rel_error=rel_error,
    )
