"""What ``inspect`` reports: a summary from config and headers, per-module rows, and (on request) spectra.

The summary and the module rows come from headers only and never import torch; spectra load the
factors and use :mod:`lora_ops` (thin QR + r x r SVD, never the dense update).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.factor_errors import module_errors
from adapterhub_cli.artifact.provenance import read_provenance
from adapterhub_cli.artifact.ref import ref_scheme


@dataclass(frozen=True)
class ModuleRow:
    """One adapted module: its name, dense update shape (d_out x d_in), rank, alpha, scale and storage dtype."""

    name: str
    kind: str
    d_out: int
    d_in: int
    rank: int
    alpha: float
    scale: float
    dtype: str
    dora: bool


@dataclass(frozen=True)
class ModuleSpectrum:
    """The spectrum of one module's update ``dW = scale * B @ A`` (DoRA: before the magnitude rescaling).

    ``effective_rank_90`` / ``_99`` are the fewest singular values holding 90% / 99% of ``||dW||_F²``;
    None when the update is zero (an untrained adapter with B = 0).
    """

    name: str
    singular_values: list[float]
    fro_norm: float
    effective_rank_90: int | None
    effective_rank_99: int | None


@dataclass
class InspectReport:
    """Everything ``adapters inspect`` shows; ``to_dict()`` is the ``--json`` output."""

    path: str
    format: str
    peft_type: str
    r: int
    lora_alpha: float
    scale_rule: str
    scale: float
    ranks: list[int]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    modules_to_save: list[str] | None
    base_model_name_or_path: str | None
    revision: str | None
    task_type: str | None
    num_modules: int
    num_parameters: int
    #: stored dtype -> elements, as the file holds them (a quantized adapter: packed factors and their scales)
    dtypes: dict[str, int]
    tensor_file: str | None
    file_size: int | None
    sha256: str | None
    metadata: dict[str, str]
    warnings: list[str]
    quantization: str | None = None
    provenance: dict[str, Any] | None = None
    modules: list[ModuleRow] | None = None
    spectrum: list[ModuleSpectrum] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: lora_bias=True: lora_B carries a bias, added as ``scale * bias`` to the layer's bias
    lora_bias: bool = False
    #: aLoRA: the token ids after which the adapter acts (PEFT refuses to merge it)
    alora_invocation_tokens: list[int] | None = None
    #: layer_replication: the ranges of base layers stacked into the adapted model
    layer_replication: list[list[int]] | None = None
    #: trainable_token_indices: embedding rows the adapter replaces (a list, or module name -> list)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    #: read from a store (or pulled from one): the ref pinning the exact version, ``hf://org/name@<commit>``
    pinned: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_report(adapter: Adapter, *, sha256: str | None, modules: bool, spectrum: bool) -> InspectReport:
    """Summarise ``adapter`` (headers only unless ``spectrum``)."""
    cfg = adapter.config
    dtypes: Counter[str] = Counter()
    for t in _stored_infos(adapter):
        dtypes[t.dtype] += t.numel
    tensor_file = adapter.tensor_file
    remote = getattr(adapter.source, "remote", None)
    return InspectReport(
        path=str(adapter.path),
        format=adapter.format,
        peft_type=cfg.peft_type,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        scale_rule=cfg.scale_rule,
        scale=cfg.scale_for("", cfg.r),
        ranks=sorted({m.rank for m in adapter.modules.values()}),
        rank_pattern=cfg.rank_pattern,
        alpha_pattern=cfg.alpha_pattern,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        fan_in_fan_out=cfg.fan_in_fan_out,
        modules_to_save=cfg.modules_to_save,
        base_model_name_or_path=cfg.base_model_name_or_path,
        revision=cfg.revision,
        task_type=cfg.task_type,
        num_modules=len(adapter.modules),
        num_parameters=adapter.num_parameters,
        dtypes=dict(dtypes),
        tensor_file=str(tensor_file) if tensor_file else None,
        file_size=tensor_file.stat().st_size if tensor_file else getattr(remote, "size", None),
        sha256=sha256,
        metadata=adapter.metadata,
        warnings=list(adapter.warnings),
        quantization=_quantization(adapter),
        provenance=read_provenance(adapter),
        modules=module_rows(adapter) if modules else None,
        spectrum=module_spectra(adapter) if spectrum else None,
        lora_bias=cfg.lora_bias or any(m.bias is not None for m in adapter.modules.values()),
        alora_invocation_tokens=cfg.alora_invocation_tokens,
        layer_replication=cfg.layer_replication,
        trainable_token_indices=cfg.raw.get("trainable_token_indices"),
        pinned=_pinned(adapter),
    )


def _stored_infos(adapter: Adapter) -> list[Any]:
    """The tensors as the file stores them: for a quantized adapter (``quantize --to int8|fp8|nf4``) the packed
    factors (I8, F8_E4M3, U8) and their F32 block scales, not the dtypes they dequantize to."""
    header = getattr(adapter.source, "header", None)
    if getattr(adapter.source, "quantization", None) is not None and header is not None:
        return list(header.tensors.values())
    return list(adapter.all_tensor_infos())


def _pinned(adapter: Adapter) -> str | None:
    """The store ref (``hf://org/name@<commit>``) an adapter read from a store, or pulled from one, records."""
    src = getattr(adapter.provenance, "source", None)
    return src if isinstance(src, str) and ref_scheme(src) is not None else None


def _quantization(adapter: Adapter) -> str | None:
    q = getattr(adapter.source, "quantization", None)
    header = adapter.source.header
    if q is None or header is None:
        return None
    stored = sorted({info.dtype for key, info in header.tensors.items() if key in q.tensors})
    return f"{q.scheme} (blocks of {q.block_size}), factors stored as {', '.join(stored)} with F32 scales"


def module_rows(adapter: Adapter) -> list[ModuleRow]:
    return [
        ModuleRow(
            name=m.name,
            kind=m.kind,
            d_out=m.d_out,
            d_in=m.d_in,
            rank=m.rank,
            alpha=m.alpha,
            scale=m.scale,
            dtype=m.dtype,
            dora=m.magnitude is not None,
        )
        for m in adapter.modules.values()
    ]


def module_spectra(adapter: Adapter) -> list[ModuleSpectrum]:
    """Singular values, Frobenius norm and 90% / 99% effective ranks of every module's update."""
    from lora_ops import energy_rank, singular_values

    out = []
    for name in adapter.modules:
        factors = adapter.factors(name, finite=True)
        with module_errors(str(adapter.path), name):
            s = singular_values(factors)
        out.append(
            ModuleSpectrum(
                name=name,
                singular_values=[float(x) for x in s],
                fro_norm=float(s.square().sum().sqrt()),
                effective_rank_90=energy_rank(s, 0.90),
                effective_rank_99=energy_rank(s, 0.99),
            )
        )
    return out
