"""Pure tensor math on LoRA factors. torch only: no files, no network, no printing.

A LoRA update is ``dW = scale * B @ A`` with ``A`` (r, d_in) and ``B`` (d_out, r). Functions here work
on the factors and never form the dense (d_out, d_in) matrix unless their name says so (:func:`delta`).
"""

from lora_ops.analysis import BaseAccumulator, BaseAnalysis, analyze_update, random_projection_baseline, top_singular
from lora_ops.combine import DenseMethod, concat, dense_merge, magnitude_prune_mask, random_prune, rescale
from lora_ops.errors import LoraOpsError, NonFiniteError, ShapeMismatchError
from lora_ops.extract import ExtractedLora, extract_lora, extract_lora_like
from lora_ops.factors import LoraFactors, check_factors, delta
from lora_ops.lycoris import fold_loha, fold_tucker
from lora_ops.merge import conv_lora_delta, lora_delta, merge_delta, merge_dora, merge_lora, unmerge_delta
from lora_ops.metrics import cosine, distance, inner, norm, relative_distance, subspace_overlap
from lora_ops.quantize import SCHEMES, Quantized, dequantize, quantize
from lora_ops.rank import (
    CoreSVD,
    ReducedLora,
    choose_rank,
    core_svd,
    energy_rank,
    reduce_rank,
    singular_values,
)


__all__ = [
    "SCHEMES",
    "BaseAccumulator",
    "BaseAnalysis",
    "CoreSVD",
    "DenseMethod",
    "ExtractedLora",
    "LoraFactors",
    "LoraOpsError",
    "NonFiniteError",
    "Quantized",
    "ReducedLora",
    "ShapeMismatchError",
    "analyze_update",
    "check_factors",
    "choose_rank",
    "concat",
    "conv_lora_delta",
    "core_svd",
    "cosine",
    "delta",
    "dense_merge",
    "dequantize",
    "distance",
    "energy_rank",
    "extract_lora",
    "extract_lora_like",
    "fold_loha",
    "fold_tucker",
    "inner",
    "lora_delta",
    "magnitude_prune_mask",
    "merge_delta",
    "merge_dora",
    "merge_lora",
    "norm",
    "quantize",
    "random_projection_baseline",
    "random_prune",
    "reduce_rank",
    "relative_distance",
    "rescale",
    "singular_values",
    "subspace_overlap",
    "top_singular",
    "unmerge_delta",
]
