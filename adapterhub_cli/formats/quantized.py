"""Quantized adapter files: PEFT's layout, with the LoRA factors stored quantized.

The safetensors metadata key ``adapterhub.quantization`` holds JSON ``{"scheme", "block_size", "tensors":
{key: {"dtype", "shape"}}}`` giving each quantized tensor's original dtype and shape. Its stored bytes sit
under the usual key (int8, fp8 e4m3 or nf4-packed uint8) and its block scales under ``<key>.qscale``.
Such a folder is not loadable by PEFT as is: ``adapters dequantize`` turns it back into one. Every other
operation reads it through :class:`QuantizedTensorSource`, which dequantizes tensor by tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import TensorSource
from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.safetensors import (
    COMPUTE_DTYPES,
    SafetensorsHeader,
    TensorInfo,
    load_safetensors,
    torch_dtype,
)
from adapterhub_cli.errors import CorruptFileError


if TYPE_CHECKING:
    import torch

QUANT_KEY = "adapterhub.quantization"
SCALE_SUFFIX = ".qscale"


@dataclass(frozen=True)
class QuantizationInfo:
    scheme: str
    block_size: int
    tensors: dict[str, dict[str, Any]]


#: The largest block size read: dequantizing pads each tensor to a whole block.
MAX_BLOCK_SIZE = 1 << 20
#: What each scheme with block scales stores: the stored dtype, and stored elements for ``n`` values.
_STORED: dict[str, tuple[str, Callable[[int], int]]] = {
    "int8": ("I8", lambda n: n),
    "fp8": ("F8_E4M3", lambda n: n),
    "nf4": ("U8", lambda n: (n + 1) // 2),  # two 4-bit codes per byte, as bitsandbytes packs them
}


def quantization_of(header: SafetensorsHeader) -> QuantizationInfo | None:
    """The quantization a file declares in its metadata (checked against the stored tensors), or None for a plain
    file.

    Raises:
        CorruptFileError: the metadata is not JSON, names an unknown scheme, a block size out of range, a dtype or
            shape that is not a float dtype and a list of sizes, a missing tensor or scale, or a stored tensor whose
            dtype or size disagrees with the scheme.
    """
    raw = header.metadata.get(QUANT_KEY)
    if raw is None:
        return None
    doc = parse_json(raw.encode(), path=header.path, what=f"{QUANT_KEY} metadata")

    def bad(message: str) -> CorruptFileError:
        return CorruptFileError(f"bad {QUANT_KEY} metadata: {message}", path=header.path)

    if not isinstance(doc, dict) or not {"scheme", "block_size", "tensors"} <= doc.keys():
        raise bad("expected an object with scheme, block_size and tensors")
    scheme, block_size, tensors = doc["scheme"], doc["block_size"], doc["tensors"]
    if scheme not in _STORED:
        raise bad(f"scheme {scheme!r} is not one of {', '.join(_STORED)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise bad(f"block_size must be an integer from 1 to {MAX_BLOCK_SIZE}, got {block_size!r}")
    if not isinstance(tensors, dict):
        raise bad("tensors must be an object")
    for key, meta in tensors.items():
        _check_quantized(header, scheme, block_size, key, meta, bad)
    return QuantizationInfo(scheme=scheme, block_size=block_size, tensors=tensors)


def _check_quantized(
    header: SafetensorsHeader,
    scheme: str,
    block_size: int,
    key: str,
    meta: object,
    bad: Callable[[str], CorruptFileError],
) -> None:
    """One quantized tensor's description against what the file stores under its key and its scale's."""
    if not isinstance(meta, dict) or meta.get("dtype") not in COMPUTE_DTYPES:
        raise bad(f"tensor {key!r} needs a dtype among {sorted(COMPUTE_DTYPES)}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"tensor {key!r}: shape {shape!r} is not a list of sizes")
    stored, scale = header.tensors.get(key), header.tensors.get(key + SCALE_SUFFIX)
    if stored is None or scale is None:
        raise bad(f"names tensor {key!r}, but the file lacks it or its {SCALE_SUFFIX} scales")
    n = math.prod(shape)
    dtype, stored_numel = _STORED[scheme]
    if stored.dtype != dtype or stored.numel != stored_numel(n):
        raise bad(f"tensor {key!r} of shape {shape} in {scheme} is stored as {stored.dtype} x {stored.numel}")
    if scale.dtype != "F32" or scale.numel != -(-n // block_size):
        raise bad(f"tensor {key!r} has {scale.numel} {scale.dtype} scales; {scheme} needs {-(-n // block_size)} F32")


def logical_infos(header: SafetensorsHeader, q: QuantizationInfo) -> dict[str, TensorInfo]:
    """Header entries as the adapter sees them: quantized tensors with their original dtype and shape,
    scale companions hidden."""
    out = {}
    for name, info in header.tensors.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in q.tensors:
            continue
        meta = q.tensors.get(name)
        if meta is not None:
            info = TensorInfo(
                name=name, dtype=str(meta["dtype"]), shape=tuple(meta["shape"]), start=info.start, end=info.end
            )
        out[name] = info
    return out


class QuantizedTensorSource(TensorSource):
    """Loads tensors from a quantized file, dequantized to their original dtype and shape."""

    def __init__(self, header: SafetensorsHeader, q: QuantizationInfo) -> None:
        super().__init__(header=header)
        self.quantization = q

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from lora_ops import Quantized, dequantize

        assert self.header is not None
        q = self.quantization
        stored = [k for k in keys if k not in q.tensors]
        quantized = [k for k in keys if k in q.tensors]
        wanted = stored + quantized + [k + SCALE_SUFFIX for k in quantized if k + SCALE_SUFFIX in self.header.tensors]
        raw = load_safetensors(self.header.path, wanted, header=self.header)
        out = {k: raw[k] for k in stored}
        for k in quantized:
            meta = q.tensors[k]
            packed = Quantized(
                data=raw[k],
                scale=raw.get(k + SCALE_SUFFIX),
                shape=tuple(meta["shape"]),
                dtype=torch_dtype(_float_dtype(meta["dtype"], self.header.path, k)),
            )
            out[k] = dequantize(packed, block_size=q.block_size, scheme=q.scheme)
        return out


def _float_dtype(name: object, path: Path, key: str) -> str:
    if name not in COMPUTE_DTYPES:
        raise CorruptFileError(
            f"quantization metadata of {key!r} names dtype {name!r}; expected one of {sorted(COMPUTE_DTYPES)}",
            path=path,
            module=key,
        )
    return str(name)
