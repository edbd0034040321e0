"""Storage quantization of factor tensors: int8 and fp8 with one scale per block, nf4 through bitsandbytes.

A tensor is flattened (row-major) and cut into blocks of ``block_size`` values; each block gets a float32
scale ``absmax / qmax`` (qmax 127 for int8, 448 for fp8 e4m3). Dequantization multiplies back. The last
block may be short. ``nf4`` uses ``bitsandbytes.functional.quantize_4bit`` (its own per-block absmax), which
runs on CPU; bitsandbytes is imported only when nf4 is used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lora_ops.errors import LoraOpsError


SCHEMES = ("int8", "fp8", "nf4", "bf16", "fp16")
_QMAX = {"int8": 127.0, "fp8": 448.0}


class Quantized(NamedTuple):
    """A quantized tensor.

    Attributes:
        data: int8 (numel,) for int8, float8_e4m3fn (numel,) for fp8, packed uint8 for nf4, or the cast tensor.
        scale: float32 (ceil(numel / block_size),) block scales (int8 / fp8), nf4's absmax, or None.
        shape: the original shape.
        dtype: the original dtype.
    """

    data: torch.Tensor
    scale: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def quantize(x: torch.Tensor, scheme: str, *, block_size: int = 64) -> Quantized:
    """Quantize ``x`` (any shape) with ``scheme`` in ``SCHEMES``.

    Example:
        >>> x = torch.randn(8, 256)
        >>> q = quantize(x, "int8")
        >>> q.data.dtype, q.scale.shape
        (torch.int8, torch.Size([32]))
        >>> float((dequantize(q, block_size=64) - x).norm() / x.norm()) < 0.01
        True
    """
    if scheme not in SCHEMES:
        raise LoraOpsError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if block_size < 1:
        raise LoraOpsError(f"block_size must be positive, got {block_size}")
    shape, dtype = tuple(x.shape), x.dtype
    if not bool(torch.isfinite(x).all()):
        raise LoraOpsError("cannot quantize a tensor holding NaN or inf")
    if scheme in ("bf16", "fp16"):
        return Quantized(x.detach().to(torch.bfloat16 if scheme == "bf16" else torch.float16), None, shape, dtype)
    if scheme == "nf4":
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(
            x.detach().to(torch.float32).contiguous(), blocksize=block_size, quant_type="nf4"
        )
        return Quantized(packed, state.absmax.to(torch.float32), shape, dtype)
    blocks = _blocks(x, block_size)
    scale = blocks.abs().amax(dim=1) / _QMAX[scheme]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = blocks / safe[:, None]
    if scheme == "int8":
        q = scaled.round().clamp(-127, 127).to(torch.int8)
    else:
        q = scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return Quantized(q.reshape(-1)[: math.prod(shape)].clone(), scale, shape, dtype)


def dequantize(q: Quantized, *, block_size: int = 64, scheme: str | None = None) -> torch.Tensor:
    """The float tensor (original shape and dtype) a :class:`Quantized` stands for.

    ``scheme`` is needed only to tell nf4's packed uint8 apart (it is inferred otherwise).
    """
    if q.scale is None:
        return q.data.to(q.dtype).reshape(q.shape)
    if scheme == "nf4" or q.data.dtype == torch.uint8:
        import bitsandbytes.functional as bnb

        state = bnb.QuantState(
            absmax=q.scale.to(torch.float32),
            shape=torch.Size(q.shape),
            code=bnb.get_4bit_type("nf4", device="cpu"),
            blocksize=block_size,
            quant_type="nf4",
            dtype=torch.float32,
        )
        return bnb.dequantize_4bit(q.data, state).to(q.dtype).reshape(q.shape)
    numel = math.prod(q.shape)
    flat = q.data.to(torch.float32)
    pad = -numel % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    values = flat.view(-1, block_size) * q.scale.to(torch.float32)[:, None]
    return values.reshape(-1)[:numel].reshape(q.shape).to(q.dtype)


__all__ = ["SCHEMES", "Quantized", "dequantize", "quantize"]
