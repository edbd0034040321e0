"""Linear combinations of LoRA updates, exact in factor space, and the element-wise merge methods.

``sum_i w_i s_i B_i A_i`` is one LoRA with ``B = [w_1 s_1 B_1 | ... ]`` (d_out, sum r_i) and
``A = [A_1; ...]`` (sum r_i, d_in), scale 1: exact, any signs, mixed ranks. Compress it with
:func:`lora_ops.reduce_rank`. TIES, DARE and magnitude pruning act element-wise on dense updates, so they
take one module's (d_out, d_in) deltas at a time; their definitions follow the papers as PEFT implements
them (``peft.utils.merge_utils``), with an explicit ``torch.Generator`` for reproducible DARE masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from lora_ops.errors import LoraOpsError, ShapeMismatchError
from lora_ops.factors import LoraFactors, check_factors


def concat(fs: Sequence[LoraFactors], weights: Sequence[float], *, dtype: torch.dtype | None = None) -> LoraFactors:
    """The exact weighted sum ``sum_i w_i s_i B_i A_i`` as one LoRA of rank ``sum_i r_i`` and scale 1.

    Args:
        fs: factors with A_i (r_i, d_in) and B_i (d_out, r_i); ranks may differ.
        weights: one weight per input; negative weights subtract.
        dtype: result dtype (default: the widest input dtype, at least float32).

    Returns:
        LoraFactors with A (sum r_i, d_in), B (d_out, sum r_i), scale 1.0.

    Example:
        >>> f = LoraFactors(torch.ones(1, 3), torch.ones(2, 1), 2.0)
        >>> concat([f, f], [1.0, -0.5]).B.tolist()
        [[2.0, -1.0], [2.0, -1.0]]
    """
    if not fs or len(fs) != len(weights):
        raise LoraOpsError(f"need one weight per input: {len(fs)} inputs, {len(weights)} weights")
    for f in fs:
        check_factors(f)
    if len({f.shape for f in fs}) != 1:
        raise ShapeMismatchError(f"updates of different shapes (d_out, d_in): {sorted({f.shape for f in fs})}")
    if dtype is None:
        dtype = torch.promote_types(torch.float32, fs[0].A.dtype)
        for f in fs:
            dtype = torch.promote_types(dtype, torch.promote_types(f.A.dtype, f.B.dtype))
    B = torch.cat([(w * f.scale) * f.B.to(dtype) for f, w in zip(fs, weights, strict=True)], dim=1)
    A = torch.cat([f.A.to(dtype) for f in fs], dim=0)
    return LoraFactors(A=A, B=B, scale=1.0)


def rescale(f: LoraFactors, scale: float) -> LoraFactors:
    """The same update with ``scale`` in front: B is multiplied by ``f.scale / scale`` (A unchanged).

    Example:
        >>> rescale(LoraFactors(torch.ones(1, 2), torch.ones(3, 1), 2.0), 4.0).B[0, 0].item()
        0.5
    """
    if scale == 0:
        raise LoraOpsError("scale must be non-zero")
    return LoraFactors(A=f.A, B=f.B * (f.scale / scale), scale=scale)


class DenseMethod(str, Enum):
    """Element-wise merge methods on dense per-module updates."""

    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    MAGNITUDE_PRUNE = "magnitude_prune"


def magnitude_prune_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (TIES "trim"); zero the rest.

    Example:
        >>> magnitude_prune_mask(torch.tensor([1.0, -3.0, 2.0, 0.5]), 0.5).tolist()
        [0.0, -3.0, 2.0, 0.0]
    """
    _check_density(density)
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density`` and divide kept ones by it."""
    _check_density(density)
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise LoraOpsError(f"density must be in (0, 1], got {density}")


def _elect_and_merge(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    sign_mass = pruned.sum(dim=0)
    majority = torch.where(sign_mass >= 0, 1.0, -1.0).to(pruned.dtype)
    agree = pruned.sign() == majority
    weighted = pruned * weights
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def dense_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: DenseMethod | str,
    *,
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge same-shaped dense updates (each (d_out, d_in)) element-wise.

    - ``magnitude_prune``: trim each to its top ``density`` magnitudes, then the weighted sum.
    - ``ties``: trim, elect the sign of each entry from the trimmed updates' sum, then the weighted mean over
      the updates that agree with it (Yadav et al., 2023).
    - ``dare_linear``: drop entries with probability ``1 - density`` and rescale by ``1 / density``, then the
      weighted sum (Yu et al., 2023). ``dare_ties``: DARE's drop, then TIES's election and disjoint mean.

    Returns:
        the merged (d_out, d_in) update, float32 or wider.
    """
    method = DenseMethod(method)
    if not deltas or len(deltas) != len(weights):
        raise LoraOpsError(f"need one weight per input: {len(deltas)} inputs, {len(weights)} weights")
    if len({tuple(d.shape) for d in deltas}) != 1:
        raise ShapeMismatchError(f"updates of different shapes: {sorted({tuple(d.shape) for d in deltas})}")
    dtype = torch.promote_types(torch.float32, deltas[0].dtype)
    if method in (DenseMethod.TIES, DenseMethod.MAGNITUDE_PRUNE):
        pruned = torch.stack([magnitude_prune_mask(d.to(dtype), density) for d in deltas])
    else:
        pruned = torch.stack([random_prune(d.to(dtype), density, generator) for d in deltas])
    w = torch.tensor(list(weights), dtype=dtype).view(-1, *([1] * (pruned.dim() - 1)))
    if method in (DenseMethod.TIES, DenseMethod.DARE_TIES):
        return _elect_and_merge(pruned, w)
    return (pruned * w).sum(dim=0)


__all__ = ["DenseMethod", "concat", "dense_merge", "magnitude_prune_mask", "random_prune", "rescale"]
