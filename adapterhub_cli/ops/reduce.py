"""Rank reduction of a whole adapter: per module, thin QR + r x r SVD, keep the top k (lora_ops.reduce_rank)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.factor_errors import module_errors
from adapterhub_cli.artifact.preflight import require_finite, require_valid
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.artifact.safetensors import COMPUTE_DTYPES, torch_dtype
from adapterhub_cli.artifact.validate import overflow_message, overflowing_update
from adapterhub_cli.errors import InvalidAdapterError, UsageError
from adapterhub_cli.formats.diffusers import pipeline_output_warnings
from adapterhub_cli.formats.peft import peft_key, rank_layout, write_peft
from adapterhub_cli.ops.checks import require_real, require_whole
from adapterhub_cli.parallel import map_modules


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModuleReduction:
    """What rank reduction did to one module."""

    name: str
    rank_before: int
    rank_after: int
    retained_energy: float
    rel_error: float


@dataclass
class ReduceResult:
    """The written adapter and, per module, the kept rank, retained energy and relative Frobenius error."""

    path: Path
    r: int
    rank_pattern: dict[str, int]
    params_before: int
    params_after: int
    modules: list[ModuleReduction] = field(default_factory=list)
    #: wall time of the operation itself (load, compute, write), without interpreter and torch start-up
    seconds: float = 0.0
    #: what the user should know about the result: nothing was reduced (every module kept its rank)
    warnings: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    @property
    def unchanged(self) -> bool:
        """Whether every module kept its rank: the output holds the input's updates (refactored), nothing less."""
        return all(m.rank_after == m.rank_before for m in self.modules)


def check_options(
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
) -> None:
    """Refuse, before anything is read, a rule set :func:`reduce_adapter` cannot follow or would partly ignore: not
    exactly one of ``rank`` / ``energy`` / ``sv_ratio`` / ``sv_fro``, a value out of range, or ``max_rank`` with
    ``rank`` (it caps only the dynamic rules).

    Raises:
        UsageError: naming the options as the CLI spells them.
    """
    rules = {"--rank": rank, "--energy": energy, "--sv-ratio": sv_ratio, "--sv-fro": sv_fro}
    chosen = [name for name, value in rules.items() if value is not None]
    if len(chosen) != 1:
        got = f" (got {', '.join(chosen)})" if chosen else ""
        raise UsageError(
            f"give exactly one of --rank, --energy, --sv-ratio, --sv-fro{got}",
            hint="--rank K keeps K singular values per module; --energy 0.99 lets each module choose",
        )
    for name, whole in (("--rank", rank), ("--max-rank", max_rank)):
        if whole is not None:
            require_whole(name, whole)
    for name, real in (("--energy", energy), ("--sv-ratio", sv_ratio), ("--sv-fro", sv_fro)):
        if real is not None:
            require_real(name, real)
    for name, value in (("--energy", energy), ("--sv-fro", sv_fro)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{name} must be in (0, 1], got {value}")
    if sv_ratio is not None and not sv_ratio >= 1:
        raise UsageError(f"--sv-ratio must be at least 1, got {sv_ratio}")
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank must be at least 1, got {max_rank}")
    if max_rank is not None and rank is not None:
        raise UsageError(
            f"--max-rank caps the rank --energy, --sv-ratio and --sv-fro choose; with --rank {rank} it has no effect",
            hint=f"give --rank {min(rank, max_rank)} alone",
        )


def _scale_rule(alpha: float, rslora: bool) -> Callable[[int], float]:
    return (lambda k: alpha / math.sqrt(k)) if rslora else (lambda k: alpha / k)


def reduce_adapter(
    adapter: Adapter,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ReduceResult:
    """Write the optimal reduced-rank version of ``adapter`` to ``out`` (PEFT layout, loads unchanged).

    Exactly one of ``rank`` / ``energy`` / ``sv_ratio`` / ``sv_fro`` chooses k per module (see
    :func:`lora_ops.choose_rank`); ``max_rank`` caps it. Modules keep their alpha and scale rule (alpha/r or
    rsLoRA's alpha/sqrt(r)) with the new rank, and the factors absorb the difference, so each output module's
    update is exactly the truncated SVD of the input's. DoRA magnitude vectors and modules_to_save tensors are
    copied unchanged; ``lora_B.bias`` tensors (``lora_bias=True``) are kept, multiplied by old scale / new scale so
    the bias term ``scale * bias`` is unchanged (to the storage dtype's rounding).
    Per-module ranks are written as PEFT's ``r`` + ``rank_pattern``.

    Nothing is silently ignored: the options are checked by :func:`check_options`, a fixed ``rank`` not below any
    module's rank (nothing could be reduced) is a :class:`UsageError`, and a dynamic rule that keeps every rank
    writes the output with a warning saying nothing was reduced (``result.unchanged``).
    """
    from lora_ops import reduce_rank

    check_options(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
    started = time.perf_counter()
    require_valid(adapter, check_weights=False)  # each module's factors are checked as they are loaded
    cfg = adapter.config
    for m in adapter.modules.values():
        if m.kind == "embedding":
            raise UsageError(f"module {m.name} is an embedding LoRA; reduce supports linear and conv layers")
    largest = max((m.rank for m in adapter.modules.values()), default=0)
    if rank is not None and rank >= largest:
        raise UsageError(
            f"--rank {rank} is not below the rank of any module of {adapter.path} (the largest is {largest}): "
            "nothing would be reduced",
            hint=f"give --rank below {largest}, or --energy / --sv-ratio / --sv-fro to let each module choose",
        )

    def reduce_module(name: str) -> tuple[Any, Any, ModuleReduction]:
        m = adapter.modules[name]
        factors = adapter.factors(name)
        require_finite(adapter, {m.A.name: factors.A, m.B.name: factors.B})
        largest = overflowing_update(factors)
        if largest is not None:  # (validate's update-overflow: the output would keep it)
            raise InvalidAdapterError(overflow_message(name, largest), path=adapter.path, module=name)
        with module_errors(str(adapter.path), name):
            red = reduce_rank(
                factors,
                rank=rank,
                energy=energy,
                sv_ratio=sv_ratio,
                sv_fro=sv_fro,
                max_rank=max_rank,
                scale=_scale_rule(m.alpha, cfg.use_rslora),
                dtype=_torch_dtype(m.A.dtype),
            )
        a, b = red.factors.A, red.factors.B
        if m.kind == "conv":  # A was (r, in, kh, kw) and B (out, r, 1, 1), flattened to matrices for the SVD
            a = a.reshape(red.rank, *m.A.shape[1:])
            b = b.reshape(b.shape[0], red.rank, 1, 1)
        return a, b, ModuleReduction(name, m.rank, red.rank, red.retained_energy, red.rel_error)

    tensors: dict[str, Any] = {}
    rows: list[ModuleReduction] = []
    for a, b, row in map_modules(reduce_module, list(adapter.modules), progress=progress):
        tensors[peft_key(row.name, "lora_A")] = a
        tensors[peft_key(row.name, "lora_B")] = b
        rows.append(row)
    magnitudes = {
        peft_key(m.name, "lora_magnitude_vector"): m.magnitude.name
        for m in adapter.modules.values()
        if m.magnitude is not None
    }
    biases = {m.bias.name: m for m in adapter.modules.values() if m.bias is not None}
    if biases:  # lora_bias: the bias term is scale * bias; keep it as the scale changes with the rank
        after_rank = {row.name: row.rank_after for row in rows}
        loaded_biases = adapter.source.load(list(biases))
        require_finite(adapter, loaded_biases)
        for key, m in biases.items():
            new_scale = _scale_rule(m.alpha, cfg.use_rslora)(after_rank[m.name])
            b = loaded_biases[key]
            tensors[peft_key(m.name, "lora_B.bias")] = (b.double() * (m.scale / new_scale)).to(b.dtype)
    extra = {adapter.key_prefix + name: info.name for name, info in adapter.extra_tensors.items()}
    loaded = adapter.source.load(list(magnitudes.values()) + list(extra.values()))
    require_finite(adapter, loaded)
    tensors.update({key: loaded[src] for key, src in {**magnitudes, **extra}.items()})
    r, rank_pattern = rank_layout({row.name: row.rank_after for row in rows})
    config = dict(cfg.raw)
    config.update(r=r, rank_pattern=rank_pattern, alpha_pattern=cfg.alpha_pattern, lora_alpha=cfg.lora_alpha)
    params = {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro, "max_rank": max_rank}
    prov = provenance("reduce", {k: v for k, v in params.items() if v is not None}, [adapter])
    path = write_peft(out, config=config, tensors=tensors, provenance=prov, overwrite=overwrite)
    after = sum(t.numel() for t in tensors.values())
    return ReduceResult(
        path=path,
        r=r,
        rank_pattern=rank_pattern,
        params_before=adapter.num_parameters,
        params_after=after,
        modules=rows,
        seconds=time.perf_counter() - started,
        warnings=_warnings(rows, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
        + pipeline_output_warnings([adapter], path),
    )


def _warnings(rows: list[ModuleReduction], **rules: float | int | None) -> list[str]:
    """Says so when a dynamic rule kept every module's rank (nothing was reduced)."""
    if not rows or any(row.rank_after != row.rank_before for row in rows):
        return []
    given = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in rules.items() if v is not None)
    return [
        f"nothing was reduced: {given} keeps every module's rank, so the output holds the same updates at the same "
        "ranks as the input"
    ]


def _torch_dtype(name: str) -> Any:
    """The factors' storage dtype, float32 for anything torch does not compute in."""
    return torch_dtype(name if name in COMPUTE_DTYPES else "F32")
