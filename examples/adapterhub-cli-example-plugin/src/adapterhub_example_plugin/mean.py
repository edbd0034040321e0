"""The ``mean`` combine method: the weighted mean of the updates, module by module.

``sum_i w_i dW_i / sum_i w_i`` over the adapters that have the module (a module only one adapter has is
kept as it is). Exact, as one LoRA of rank ``sum_i r_i``; with ``--rank`` it is compressed to its optimal
rank-k approximation. Uniform weights give the plain average of "model soups" (Wortsman et al., 2022).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterhub_cli import UsageError
from adapterhub_cli.ops.methods import CombinedFactors


if TYPE_CHECKING:
    from lora_ops import LoraFactors


REFERENCE = "https://arxiv.org/abs/2203.05482"


def mean(
    factors: list[LoraFactors], weights: list[float], *, rank: int | None = None, alpha: float = 1.0
) -> LoraFactors | CombinedFactors:
    """The weighted mean of the updates; exact, or compressed to --rank."""
    from lora_ops import concat, reduce_rank

    total = sum(weights)
    if total == 0:
        raise UsageError("mean: the weights of a module's adapters sum to 0", hint="give weights with a non-zero sum")
    exact = concat(factors, [w / total for w in weights])
    if rank is None:
        return exact
    reduced = reduce_rank(exact, rank=rank, scale=lambda k: alpha / k)
    return CombinedFactors(reduced.factors, reduced.rel_error)
