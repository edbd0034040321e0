"""Quantized adapter files: PEFT's layout, with the LoRA factors stored quantized.

The safetensors metadata key ``adapterhub.quantization`` holds JSON ``{"scheme", "block_size", "tensors":
{key: {"dtype", "shape"}}}`` giving each quantized tensor's original dtype and shape. Its stored bytes sit
under the usual key (int8, fp8 e4m3 or nf4-packed uint8) and its block scales under ``<key>.qscale``.
Such a folder is not loadable by PEFT as is: ``adapters dequantize`` turns it back into one. Every other
operation reads it through :class:`QuantizedTensorSource`, which dequantizes tensor by tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import TensorSource
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


def quantization_of(header: SafetensorsHeader) -> QuantizationInfo | None:
    """The quantization a file declares in its metadata, or None for a plain file."""
    raw = header.metadata.get(QUANT_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        info = QuantizationInfo(
            scheme=str(doc["scheme"]), block_size=int(doc["block_size"]), tensors=dict(doc["tensors"])
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"bad {QUANT_KEY} metadata ({e})", path=header.path) from e
    missing = [k for k in info.tensors if k not in header.tensors]
    if missing:
        raise CorruptFileError(f"quantization metadata names missing tensors, e.g. {missing[0]!r}", path=header.path)
    return info


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
