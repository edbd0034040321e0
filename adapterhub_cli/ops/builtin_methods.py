"""The built-in combine methods, registered through ``adapters_register_methods`` like any plugin's.

``cat`` is exact: the weighted sum of the updates as one LoRA whose rank is the sum of the ranks.
``linear`` and ``svd`` are the same exact sum compressed to its optimal rank-k approximation (thin QR +
core SVD); unlike PEFT's ``linear``, which adds the A's and the B's separately and so creates cross terms
``B_i A_j``. ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` act element-wise on each module's
dense update (d_out x d_in), then the result is compressed to rank k by a dense SVD. The math is
:mod:`lora_ops.combine`; torch is imported only when a method runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from adapterhub_cli.ops.methods import CombinedFactors
from adapterhub_cli.plugins.hookspecs import hookimpl


if TYPE_CHECKING:
    import torch

    from lora_ops import LoraFactors


PEFT_MERGING = "https://huggingface.co/docs/peft/developer_guides/model_merging"
TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
ECKART_YOUNG = "https://doi.org/10.1007/BF02288367"


def cat(factors: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """The exact weighted sum ``sum_i w_i s_i B_i A_i`` as one LoRA of rank ``sum_i r_i``."""
    from lora_ops import concat

    return concat(factors, weights)


def low_rank_sum(
    factors: list[LoraFactors], weights: list[float], *, rank: int | None = None, alpha: float = 1.0
) -> CombinedFactors:
    """The exact weighted sum compressed to its optimal rank ``rank`` (default: the largest input rank)."""
    from lora_ops import concat, reduce_rank

    red = reduce_rank(concat(factors, weights), rank=rank or _largest(factors), scale=lambda k: alpha / k)
    return CombinedFactors(red.factors, red.rel_error)


def ties(
    factors: list[LoraFactors], weights: list[float], *, density: float, rank: int | None = None, alpha: float = 1.0
) -> CombinedFactors:
    """TIES: trim each update to its top ``density`` entries, elect signs, average the agreeing entries."""
    return _elementwise("ties", factors, weights, density=density, rank=rank, alpha=alpha)


def magnitude_prune(
    factors: list[LoraFactors], weights: list[float], *, density: float, rank: int | None = None, alpha: float = 1.0
) -> CombinedFactors:
    """Trim each update to its top ``density`` entries, then the weighted sum."""
    return _elementwise("magnitude_prune", factors, weights, density=density, rank=rank, alpha=alpha)


def dare_linear(
    factors: list[LoraFactors],
    weights: list[float],
    *,
    density: float,
    rank: int | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> CombinedFactors:
    """DARE: drop entries at random (keep ``density``), rescale by ``1 / density``, then the weighted sum."""
    return _elementwise("dare_linear", factors, weights, density=density, rank=rank, alpha=alpha, generator=generator)


def dare_ties(
    factors: list[LoraFactors],
    weights: list[float],
    *,
    density: float,
    rank: int | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> CombinedFactors:
    """DARE's random drop, then TIES's sign election and disjoint mean."""
    return _elementwise("dare_ties", factors, weights, density=density, rank=rank, alpha=alpha, generator=generator)


def _largest(factors: list[LoraFactors]) -> int:
    return max(f.rank for f in factors)


def _elementwise(
    kind: str,
    factors: list[LoraFactors],
    weights: list[float],
    *,
    density: float,
    rank: int | None,
    alpha: float,
    generator: torch.Generator | None = None,
) -> CombinedFactors:
    from lora_ops import dense_merge

    deltas = [f.scale * (f.B.float() @ f.A.float()) for f in factors]
    merged = dense_merge(deltas, weights, kind, density=density, generator=generator)
    return dense_to_lora(merged, rank or _largest(factors), alpha)


def dense_to_lora(delta: torch.Tensor, k: int, alpha: float) -> CombinedFactors:
    """Optimal rank-k factors of a dense (d_out, d_in) update with scale alpha / k, and the relative error."""
    from lora_ops import LoraFactors
    from lora_ops.errors import LoraOpsError
    from lora_ops.svd import thin_svd

    if not (math.isfinite(alpha) and alpha != 0):
        raise LoraOpsError(f"the output's lora_alpha must be finite and non-zero, got {alpha}")
    u, s, vh = thin_svd(delta.double())
    k = max(1, min(k, s.numel()))
    root = (s[:k] / abs(alpha / k)).sqrt()
    sign = 1.0 if alpha > 0 else -1.0  # a negative alpha (PEFT takes it) is kept: B carries the sign
    total = float(s.square().sum())
    err = 0.0 if total == 0 else math.sqrt(float(s[k:].square().sum()) / total)
    return CombinedFactors(LoraFactors(A=root[:, None] * vh[:k], B=u[:, :k] * (sign * root), scale=alpha / k), err)


@hookimpl
def adapters_register_methods(register: Callable[..., Any]) -> None:
    register("cat", cat, description="exact weighted sum; rank = the sum of the input ranks", reference=PEFT_MERGING)
    register(
        "linear",
        low_rank_sum,
        description="exact weighted sum compressed optimally to --rank (no cross terms)",
        reference=ECKART_YOUNG,
    )
    register("svd", low_rank_sum, description="same as linear (PEFT's name for it)", reference=ECKART_YOUNG)
    register("ties", ties, description="TIES: trim, elect sign, disjoint mean; then rank k", reference=TIES_PAPER)
    register(
        "dare_linear",
        dare_linear,
        description="DARE drop and rescale, weighted sum; then rank k",
        reference=DARE_PAPER,
    )
    register("dare_ties", dare_ties, description="DARE drop, then TIES election; then rank k", reference=DARE_PAPER)
    register(
        "magnitude_prune",
        magnitude_prune,
        description="trim to the largest entries, weighted sum; then rank k",
        reference=PEFT_MERGING,
    )
