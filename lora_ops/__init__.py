"""Pure tensor math on LoRA factors. torch only: no files, no network, no printing.

A LoRA update is ``dW = scale * B @ A`` with ``A`` (r, d_in) and ``B`` (d_out, r). Functions here work
on the factors and never form the dense (d_out, d_in) matrix unless their name says so (:func:`delta`).
"""

from lora_ops.errors import LoraOpsError, ShapeMismatchError
from lora_ops.factors import LoraFactors, check_factors, delta
from lora_ops.rank import CoreSVD, core_svd, energy_rank, singular_values


__all__ = [
    "CoreSVD",
    "LoraFactors",
    "LoraOpsError",
    "ShapeMismatchError",
    "check_factors",
    "core_svd",
    "delta",
    "energy_rank",
    "singular_values",
]
