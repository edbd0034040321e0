"""The LoRA factor triple and its checks."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_ops.errors import ShapeMismatchError


class LoraFactors(NamedTuple):
    """One LoRA update ``dW = scale * B @ A``.

    Attributes:
        A: (r, d_in) down projection.
        B: (d_out, r) up projection.
        scale: the scalar in front (alpha / r, or alpha / sqrt(r) with rsLoRA).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the dense update."""
        return int(self.B.shape[0]), int(self.A.shape[1])


def check_factors(f: LoraFactors) -> LoraFactors:
    """Return ``f`` if ``A`` is (r, d_in) and ``B`` is (d_out, r); raise :class:`ShapeMismatchError` otherwise.

    Example:
        >>> check_factors(LoraFactors(torch.zeros(4, 16), torch.zeros(8, 4), 2.0)).shape
        (8, 16)
    """
    if f.A.ndim != 2 or f.B.ndim != 2:
        raise ShapeMismatchError(f"A and B must be matrices, got A {tuple(f.A.shape)} and B {tuple(f.B.shape)}")
    if f.A.shape[0] != f.B.shape[1]:
        raise ShapeMismatchError(
            f"rank mismatch: A is {tuple(f.A.shape)} (r={f.A.shape[0]}) but B is {tuple(f.B.shape)} (r={f.B.shape[1]})"
        )
    return f


def delta(f: LoraFactors, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense update ``scale * B @ A`` of shape (d_out, d_in), computed in ``dtype``.

    This forms the d_out x d_in matrix: use it for merges and references, not for analysis.

    Example:
        >>> delta(LoraFactors(torch.ones(1, 3), torch.ones(2, 1), 0.5)).shape
        torch.Size([2, 3])
    """
    check_factors(f)
    return f.scale * (f.B.to(dtype) @ f.A.to(dtype))
