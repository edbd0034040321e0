"""The only exceptions `lora_ops` raises."""

from __future__ import annotations


class LoraOpsError(ValueError):
    """Invalid input to a factor operation (bad rank, bad threshold, ...)."""


class NonFiniteError(LoraOpsError):
    """Factors or a scale holding NaN or inf, where a decomposition needs finite numbers."""


class ShapeMismatchError(LoraOpsError):
    """Factors whose shapes do not fit together: A is (r, d_in), B is (d_out, r)."""
