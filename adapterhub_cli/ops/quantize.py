"""Quantize an adapter's factors for storage, and turn a quantized adapter back into a PEFT-loadable one."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.preflight import require_no_overflow, require_valid
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.artifact.safetensors import dtype_name
from adapterhub_cli.errors import InvalidAdapterError, UsageError
from adapterhub_cli.formats.peft import write_peft
from adapterhub_cli.formats.quantized import QUANT_KEY, SCALE_SUFFIX
from adapterhub_cli.ops.checks import require_whole
from adapterhub_cli.parallel import map_modules


CASTS = ("bf16", "fp16")  # schemes that are a plain cast: no blocks, no scales
DEFAULT_BLOCK = 64  # values per scale of int8 / fp8 / nf4
#: the largest block: one scale per 64k values is already far beyond what keeps an error small, and a block is
#: padded to its size (a block of 2**28 values took 10 GB to quantize a 24 KB adapter)
MAX_BLOCK = 1 << 16
NF4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts


@dataclass(frozen=True)
class ModuleQuantization:
    """Stored bytes of one module's A and B before and after, and the relative error of its update."""

    name: str
    bytes_before: int
    bytes_after: int
    rel_error: float


@dataclass
class QuantizeResult:
    path: Path
    scheme: str
    block_size: int
    bytes_before: int
    bytes_after: int
    file_size: int
    modules: list[ModuleQuantization] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size())


def quantize_adapter(
    adapter: Adapter,
    out: str | Path,
    *,
    scheme: str,
    block_size: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> QuantizeResult:
    """Store ``adapter``'s lora_A / lora_B quantized (``int8`` / ``fp8`` with float32 block scales, ``nf4``
    via bitsandbytes, or a plain ``bf16`` / ``fp16`` cast). Other tensors are copied. The error reported per
    module is ``||dW_q - dW||_F / ||dW||_F``, from the factors."""
    from lora_ops import SCHEMES, LoraFactors, dequantize, distance, norm, quantize

    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if block_size is not None and scheme in CASTS:
        raise UsageError(f"--block-size applies to int8, fp8 and nf4; --to {scheme} is a plain cast")
    if block_size is None:
        block_size = DEFAULT_BLOCK
    require_whole("--block-size", block_size, maximum=MAX_BLOCK)
    if scheme == "nf4" and block_size not in NF4_BLOCKS:
        raise UsageError(
            f"--block-size {block_size}: bitsandbytes' nf4 takes {', '.join(map(str, NF4_BLOCKS))}",
            hint=f"the default is {DEFAULT_BLOCK}",
        )
    if scheme == "nf4":
        _require_bitsandbytes()
    if adapter.metadata.get(QUANT_KEY):
        raise UsageError(f"{adapter.path} is already quantized", hint="dequantize it first")
    require_valid(adapter)

    def quantize_module(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], ModuleQuantization]:
        m = adapter.modules[name]
        loaded = adapter.source.load([m.A.name, m.B.name])
        stored_size = {m.A.name: m.A.nbytes, m.B.name: m.B.nbytes}
        out: dict[str, Any] = {}
        described: dict[str, dict[str, Any]] = {}
        before = after = 0
        restored = {}
        for key, tensor in loaded.items():
            q = quantize(tensor, scheme, block_size=block_size)
            out[key] = q.data
            if q.scale is not None:
                out[key + SCALE_SUFFIX] = q.scale
                described[key] = {"dtype": _st_dtype(tensor), "shape": list(tensor.shape)}
            before += stored_size.get(key, _nbytes(tensor))  # as stored (fp8 factors load as float32)
            after += _nbytes(q.data) + (_nbytes(q.scale) if q.scale is not None else 0)
            restored[key] = dequantize(q, block_size=block_size, scheme=scheme).to(tensor.dtype)
            _require_representable(restored[key], tensor, scheme, adapter, name, key)
        a, b, a_q, b_q = loaded[m.A.name], loaded[m.B.name], restored[m.A.name], restored[m.B.name]
        original = LoraFactors(A=a.reshape(a.shape[0], -1), B=b.reshape(b.shape[0], -1), scale=m.scale)
        approx = LoraFactors(A=a_q.reshape(a_q.shape[0], -1), B=b_q.reshape(b_q.shape[0], -1), scale=m.scale)
        n = norm(original)
        return out, described, ModuleQuantization(name, before, after, distance(original, approx) / n if n else 0.0)

    stored: dict[str, Any] = {}
    described: dict[str, dict[str, Any]] = {}
    rows = []
    for out_tensors, desc, row in map_modules(quantize_module, list(adapter.modules), progress=progress):
        stored.update(out_tensors)
        described.update(desc)
        rows.append(row)
    others = [t.name for t in adapter.all_tensor_infos() if t.name not in stored]
    stored.update(adapter.source.load(others))
    prov = provenance("quantize", {"scheme": scheme, "block_size": block_size}, [adapter])
    meta = (
        {QUANT_KEY: json.dumps({"scheme": scheme, "block_size": block_size, "tensors": described}, sort_keys=True)}
        if described
        else {}
    )
    path = write_peft(
        out, config=dict(adapter.config.raw), tensors=stored, provenance=prov, overwrite=overwrite, metadata=meta
    )
    return QuantizeResult(
        path=path,
        scheme=scheme,
        block_size=block_size,
        bytes_before=sum(r.bytes_before for r in rows),
        bytes_after=sum(r.bytes_after for r in rows),
        file_size=(path / "adapter_model.safetensors").stat().st_size,
        modules=rows,
    )


#: ``dequantize --dtype`` values
DEQUANTIZE_DTYPES = ("fp32", "bf16", "fp16")


def dequantize_adapter(adapter: Adapter, out: str | Path, *, overwrite: bool = False, dtype: str = "fp32") -> Path:
    """Write an adapter this tool quantized (int8 / fp8 / nf4 factors) or cast (``quantize --to bf16|fp16``) back
    as a plain PEFT adapter: every floating tensor (A, B and the rest, ``[r, d_in]`` / ``[d_out, r]`` ...) in
    ``dtype`` (``fp32`` by default, ``bf16`` or ``fp16``), the scale companions gone, the config unchanged.

    Raises:
        UsageError: an unknown ``dtype``, or an adapter neither quantized nor cast by this tool.
        InvalidAdapterError: the values do not fit ``dtype`` (beyond fp16's range).
    """
    import torch

    from adapterhub_cli.artifact.provenance import read_provenance
    from adapterhub_cli.artifact.safetensors import COMPUTE_DTYPES, DTYPE_OPTIONS, torch_dtype

    if dtype not in DEQUANTIZE_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DEQUANTIZE_DTYPES)}")
    record = read_provenance(adapter) or {}
    quantized = bool(adapter.metadata.get(QUANT_KEY))
    if not quantized and record.get("operation") != "quantize":
        raise UsageError(
            f"{adapter.path} is not quantized by this tool; nothing to dequantize",
            hint="dequantize takes what `adapters quantize` wrote; other adapters load in PEFT as they are",
        )
    require_valid(adapter, check_weights=False)
    target = torch_dtype(DTYPE_OPTIONS[dtype])
    tensors = adapter.source.load([t.name for t in adapter.all_tensor_infos()])
    require_no_overflow(adapter, tensors)  # (validate's update-overflow: the output would keep it)
    for key, t in tensors.items():
        if dtype_name(t.dtype) in COMPUTE_DTYPES:
            cast = t.to(target)
            if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(t).all()):
                raise InvalidAdapterError(
                    f"{dtype} cannot hold tensor {key} (largest |value| {float(t.float().abs().max()):g})",
                    path=adapter.path,
                    module=key,
                    hint="choose --dtype fp32 or bf16",
                )
            tensors[key] = cast.contiguous()
    prov = provenance("dequantize", {"dtype": dtype}, [adapter])
    return write_peft(out, config=dict(adapter.config.raw), tensors=tensors, provenance=prov, overwrite=overwrite)


def _require_representable(restored: Any, tensor: Any, scheme: str, adapter: Adapter, module: str, key: str) -> None:
    """Refuse a factor that ``scheme`` cannot hold (a ``fp16`` cast of values beyond 65504 becomes inf): checked on
    its round trip, before anything is written."""
    import torch

    if bool(torch.isfinite(restored).all()):
        return
    largest = float(tensor.float().abs().max())
    raise InvalidAdapterError(
        f"{scheme} cannot hold tensor {key} (largest |value| {largest:g}): it would be stored as inf or NaN",
        path=adapter.path,
        module=module,
        hint="choose a scheme with a wider range (bf16, or int8 / fp8 with their block scales)",
    )


def _st_dtype(t: Any) -> str:
    return dtype_name(t.dtype)


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UsageError("nf4 needs bitsandbytes", hint="pip install 'adapterhub-cli[quant]'") from e
