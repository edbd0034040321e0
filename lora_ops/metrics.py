"""Comparisons of LoRA updates computed from their factors, never from dense d_out x d_in matrices.

``<B1 A1, B2 A2>_F = trace((B1ᵀ B2)(A2 A1ᵀ))`` costs ``O((d_out + d_in) r1 r2)``. Distances do not use
``sqrt(|a|² + |b|² - 2<a,b>)`` (catastrophic cancellation when the updates are close): they take the
singular values of the difference, itself a LoRA with factors ``[s1 B1, -s2 B2]`` and ``[A1; A2]``.
"""

from __future__ import annotations

import torch

from lora_ops.combine import concat
from lora_ops.errors import ShapeMismatchError
from lora_ops.factors import LoraFactors, check_factors
from lora_ops.rank import core_svd, singular_values


def _same_shape(f1: LoraFactors, f2: LoraFactors) -> None:
    check_factors(f1)
    check_factors(f2)
    if f1.shape != f2.shape:
        raise ShapeMismatchError(f"updates of different shapes: {f1.shape} and {f2.shape} (d_out, d_in)")


def inner(f1: LoraFactors, f2: LoraFactors) -> float:
    """Frobenius inner product ``<s1 B1 A1, s2 B2 A2>`` in float64.

    Args:
        f1: A (r1, d_in), B (d_out, r1).
        f2: A (r2, d_in), B (d_out, r2).

    Example:
        >>> f = LoraFactors(torch.eye(2, 4), torch.eye(3, 2), 2.0)
        >>> inner(f, f)
        8.0
    """
    _same_shape(f1, f2)
    b1, a1 = f1.B.detach().double(), f1.A.detach().double()
    b2, a2 = f2.B.detach().double(), f2.A.detach().double()
    return float(f1.scale * f2.scale * torch.trace((b1.T @ b2) @ (a2 @ a1.T)))


def norm(f: LoraFactors) -> float:
    """Frobenius norm of ``scale * B @ A`` (from the r x r core's singular values).

    Example:
        >>> norm(LoraFactors(torch.eye(2, 4), torch.eye(3, 2), 2.0))
        2.8284271247461903
    """
    return float(singular_values(f).square().sum().sqrt())


def distance(f1: LoraFactors, f2: LoraFactors) -> float:
    """``||dW1 - dW2||_F``, exact to float64 rounding even when the updates nearly coincide.

    Example:
        >>> f = LoraFactors(torch.eye(2, 4), torch.eye(3, 2), 2.0)
        >>> distance(f, f)
        0.0
    """
    _same_shape(f1, f2)
    return norm(concat([f1, f2], [1.0, -1.0], dtype=torch.float64))


def cosine(f1: LoraFactors, f2: LoraFactors) -> float | None:
    """Cosine similarity of the two updates; None when either is zero (the angle is undefined).

    Example:
        >>> f = LoraFactors(torch.eye(2, 4), torch.eye(3, 2), 2.0)
        >>> round(cosine(f, LoraFactors(f.A, f.B, -1.0)), 12)
        -1.0
    """
    n1, n2 = norm(f1), norm(f2)
    if n1 == 0.0 or n2 == 0.0:
        return None
    return max(-1.0, min(1.0, inner(f1, f2) / (n1 * n2)))


def _numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * 1e-10).sum())


def subspace_overlap(f1: LoraFactors, f2: LoraFactors, k: int | None = None) -> float | None:
    """How much the top-k singular subspaces of two updates coincide, in [0, 1].

    The mean of the output-side ``||U1ᵀ U2||_F² / k`` and input-side ``||V1ᵀ V2||_F² / k`` overlaps, where
    U, V are the top-k left / right singular vectors (d_out x k, d_in x k). 1 means the same subspaces,
    0 orthogonal ones. ``k`` defaults to the smaller numerical rank; None when either update is zero.

    Example:
        >>> f = LoraFactors(torch.randn(3, 16), torch.randn(8, 3), 1.0)
        >>> round(subspace_overlap(f, LoraFactors(f.A, 5 * f.B, 1.0)), 6)
        1.0
    """
    _same_shape(f1, f2)
    c1, c2 = core_svd(f1), core_svd(f2)
    kmax = min(_numerical_rank(c1.S), _numerical_rank(c2.S))
    if kmax == 0:
        return None
    k = kmax if k is None else max(1, min(k, kmax))
    u1, u2 = c1.Q_b @ c1.U[:, :k], c2.Q_b @ c2.U[:, :k]
    v1, v2 = c1.Q_a @ c1.Vh[:k].T, c2.Q_a @ c2.Vh[:k].T
    left = float((u1.T @ u2).square().sum()) / k
    right = float((v1.T @ v2).square().sum()) / k
    return min(1.0, (left + right) / 2)


def relative_distance(f1: LoraFactors, f2: LoraFactors) -> float | None:
    """``||dW1 - dW2|| / ||dW1||``; None when dW1 is zero."""
    n1 = norm(f1)
    return None if n1 == 0.0 else distance(f1, f2) / n1


__all__ = ["cosine", "distance", "inner", "norm", "relative_distance", "subspace_overlap"]
