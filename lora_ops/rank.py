"""Spectra of LoRA updates from their factors: thin QR of B and Aᵀ, then the SVD of the r x r core.

For ``dW = s B A`` with ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a``, ``dW = Q_b (s R_b R_aᵀ) Q_aᵀ``; the
orthonormal outer factors do not change singular values, so the spectrum of ``dW`` is the spectrum
of the r x r core. Cost ``O((d_out + d_in) r²)`` instead of a dense SVD's ``O(d_out d_in min(d_out, d_in))``.
The QR runs in float64: the Gram-matrix shortcut loses singular values below ~5e-4·σ₁ in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_ops.errors import LoraOpsError
from lora_ops.factors import LoraFactors, check_factors


class CoreSVD(NamedTuple):
    """Factored SVD of ``dW = scale * B @ A``: ``dW = (Q_b U) diag(S) (Q_a V)ᵀ``.

    Attributes:
        Q_b: (d_out, r) orthonormal columns.
        U: (r, r) left singular vectors of the core.
        S: (r,) singular values of dW, descending (float64).
        Vh: (r, r) right singular vectors of the core, transposed.
        Q_a: (d_in, r) orthonormal columns.
    """

    Q_b: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    Q_a: torch.Tensor


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
    core = float(f.scale) * (r_b @ r_a.T)
    u, s, vh = torch.linalg.svd(core)
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
