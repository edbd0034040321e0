"""Combining several adapters into one, module by module (one module's tensors in memory at a time).

The per-module math is a combine method from the registry (:mod:`adapterhub_cli.ops.methods`): the built-ins
(``cat``, ``linear``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, see
:mod:`adapterhub_cli.ops.builtin_methods`) and any a plugin registers. This module checks that the inputs fit
together, calls the method on each module and writes the result as one PEFT adapter with scale alpha / rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.factor_errors import module_errors
from adapterhub_cli.artifact.preflight import require_valid
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.errors import IncompatibleBaseError, PluginError, UsageError
from adapterhub_cli.formats.diffusers import pipeline_output_warnings
from adapterhub_cli.formats.peft import peft_key, rank_layout, write_peft
from adapterhub_cli.ops.checks import MAX_SEED, require_real, require_whole
from adapterhub_cli.ops.methods import CombineMethod, get_method


@dataclass(frozen=True)
class ModuleCombination:
    """One output module: how many inputs had it, its rank, and the relative error of the rank compression
    against the method's full-rank result (0 for ``cat``)."""

    name: str
    inputs: int
    rank: int
    rel_error: float


@dataclass
class CombineResult:
    """The written adapter, per module its inputs, rank and compression error, and ``warnings``: what the user
    should know about the result (modules whose weighted inputs cancel to a zero update, a ``--rank`` above what
    the combination holds)."""

    path: Path
    method: str
    weights: list[float]
    r: int
    rank_pattern: dict[str, int]
    modules: list[ModuleCombination] = field(default_factory=list)
    #: modules whose combined update is zero (the weighted inputs cancel): they change nothing
    zero_modules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_zero(self) -> bool:
        """Whether the whole output changes nothing (every module's update is zero)."""
        return bool(self.modules) and len(self.zero_modules) == len(self.modules)


#: a combined update whose Frobenius norm is below this fraction of ``sum_i |w_i| ||dW_i||`` is zero: the weighted
#: inputs cancel (what is left is float rounding)
ZERO_TOLERANCE = 1e-6


def check_options(
    method: str,
    *,
    count: int,
    weights: list[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
) -> None:
    """Refuse, before anything is read, what :func:`combine_adapters` would refuse or silently ignore: an unknown
    method, a weight count other than ``count`` (the number of adapters), an option the method does not use
    (``--rank`` / ``--density`` with ``cat``, ``--seed`` without randomness) or a required one missing.

    Raises:
        UsageError: naming the option as the CLI spells it.
    """
    spec = get_method(method)
    if count < 1:
        raise UsageError("give at least one adapter to combine")
    if weights is not None and len(weights) != count:
        raise UsageError(
            f"--weights has {len(weights)} value(s) for {count} adapter(s): give one weight per adapter",
            hint="e.g. --weights " + ",".join(["1"] * count),
        )
    if rank is not None:
        require_whole("--rank", rank)
    if seed is not None:
        require_whole("--seed", seed, minimum=0, maximum=MAX_SEED)
    if density is not None and not 0 < require_real("--density", density) <= 1:
        raise UsageError(f"--density must be in (0, 1], got {density}")
    spec.check_options({"rank": rank, "density": density, "seed": seed})


def check_compatible(adapters: list[Adapter], *, force: bool = False) -> None:
    """Refuse inputs that cannot be combined: a module with other shapes, other declared bases (unless
    ``force``), DoRA, ``lora_bias`` biases, non-linear LoRA layers, saved full modules, or disagreeing
    fan_in_fan_out."""
    shapes: dict[str, tuple[tuple[int, int], str, tuple[int, ...]]] = {}
    for a in adapters:
        for m in a.modules.values():
            if m.kind == "embedding":
                raise UsageError(f"{a.path}: module {m.name} is an embedding LoRA; combine supports linear and conv")
            seen = shapes.setdefault(m.name, ((m.d_out, m.d_in), str(a.path), m.A.shape[1:]))
            if seen[0] != (m.d_out, m.d_in) or seen[2] != m.A.shape[1:]:
                raise IncompatibleBaseError(
                    f"module {m.name} is {seen[0][0]} x {seen[0][1]} in {seen[1]} but {m.d_out} x {m.d_in} in "
                    f"{a.path}: the adapters are for different base models"
                )
        if any(m.bias is not None for m in a.modules.values()):
            raise UsageError(
                f"{a.path} has lora_B biases (lora_bias=True): combine does not blend biases (the combine methods "
                "work on the A and B factors only)",
                hint="merge lora_bias adapters into the base one at a time instead",
            )
        if a.config.use_dora:
            raise UsageError(
                f"{a.path} is a DoRA adapter: its magnitude vectors cannot be combined linearly",
                hint="merge DoRA adapters into the base one at a time instead",
            )
        if a.extra_tensors:
            raise UsageError(
                f"{a.path} saves full modules ({', '.join(sorted(a.extra_tensors)[:3])}): combine cannot blend them",
                hint="combine adapters without modules_to_save",
            )
    for what, value in (
        ("alora_invocation_tokens (aLoRA)", lambda a: str(a.config.alora_invocation_tokens)),
        ("layer_replication", lambda a: str(a.config.layer_replication)),
    ):
        if len({value(a) for a in adapters}) > 1:
            raise IncompatibleBaseError(
                f"the adapters disagree on {what}: {', '.join(f'{a.path}: {value(a)}' for a in adapters)}; "
                "one adapter cannot hold both",
                hint="combine adapters of the same kind",
            )
    if len({a.config.fan_in_fan_out for a in adapters}) > 1:
        raise IncompatibleBaseError("the adapters disagree on fan_in_fan_out: they target different layer types")
    declared = {a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path}
    if len(declared) > 1 and not force:
        raise IncompatibleBaseError(
            f"the adapters declare different base models: {', '.join(sorted(declared))}",
            hint="pass --force if they are the same model under different names",
        )


def combine_adapters(
    adapters: list[Adapter],
    out: str | Path,
    *,
    weights: list[float],
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CombineResult:
    """Write one adapter whose update, per module, is the ``method`` combination of the inputs' updates.

    ``method`` names a registered combine method; ``rank``, ``density`` and ``seed`` (default 0) go to the method,
    which must take each one given (:func:`check_options`: a method that requires one it is not given, or is given
    one it would ignore, is a :class:`UsageError`). Modules whose weighted inputs cancel (``A A --weights 1,-1``)
    are listed in ``zero_modules`` and named in ``warnings``.
    """
    import torch

    check_options(method, count=len(adapters), weights=weights, rank=rank, density=density, seed=seed)
    spec = get_method(method)
    for a in adapters:
        require_valid(a)
    check_compatible(adapters, force=force)
    alpha = float(adapters[0].config.lora_alpha)
    generator = torch.Generator().manual_seed(seed or 0) if "seed" in spec.params else None
    names = sorted({n for a in adapters for n in a.modules})
    tensors: dict[str, Any] = {}
    rows = []
    zero: list[str] = []
    for i, name in enumerate(names):
        members = [(a, w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        a_out, b_out, k, err, is_zero = _combine_module(
            spec, name, members, alpha=alpha, rank=rank, density=density, generator=generator
        )
        tensors[peft_key(name, "lora_A")] = a_out
        tensors[peft_key(name, "lora_B")] = b_out
        rows.append(ModuleCombination(name, len(members), k, err))
        if is_zero:
            zero.append(name)
        if progress:
            progress(i + 1, len(names))
    warnings = _warnings(rows, zero, rank=rank, method=method)
    r, rank_pattern = rank_layout({row.name: row.rank for row in rows})
    config = dict(adapters[0].config.raw)
    config.update(
        r=r,
        rank_pattern=rank_pattern,
        lora_alpha=alpha,
        alpha_pattern={},
        use_rslora=False,
        use_dora=False,
        target_modules=names,
        modules_to_save=None,
    )
    used_seed = (seed or 0) if "seed" in spec.params else None  # the seed a seeded method ran with, default 0
    params: dict[str, Any] = {
        "method": method,
        "weights": weights,
        "rank": rank,
        "density": density,
        "seed": used_seed,
    }
    prov = provenance("combine", {k: v for k, v in params.items() if v is not None}, adapters)
    path = write_peft(out, config=config, tensors=tensors, provenance=prov, overwrite=overwrite)
    return CombineResult(
        path=path,
        method=method,
        weights=list(weights),
        r=r,
        rank_pattern=rank_pattern,
        modules=rows,
        zero_modules=zero,
        warnings=warnings + pipeline_output_warnings(adapters, path),
    )


def _warnings(rows: list[ModuleCombination], zero: list[str], *, rank: int | None, method: str) -> list[str]:
    """What the user should know about a combination: updates that cancel, a ``--rank`` no module reached."""
    out = []
    why = "(the weighted inputs cancel, or are zero)"
    if rows and len(zero) == len(rows):
        out.append(f"the combined update is zero in every module {why}: the output adapter changes nothing")
    elif zero:
        shown = ", ".join(zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        out.append(f"{len(zero)} module(s) combine to a zero update {why}: {shown}")
    if rank is not None and rows and all(row.rank < rank for row in rows):
        top = max(row.rank for row in rows)
        out.append(
            f"--rank {rank} is above the rank every module's {method} combination has (at most {top}): "
            "the modules keep that rank"
        )
    return out


def _norm(a: Any, b: Any, scale: float) -> float:
    """``||scale B A||_F`` of A (r, d_in) and B (d_out, r) from the r x r Gram matrices in float64, never the
    dense (d_out, d_in) update: ``||BA||_F² = sum((BᵀB) ∘ (AAᵀ))``."""
    a, b = a.double(), b.double()
    return abs(float(scale)) * float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())


def _combine_module(
    spec: CombineMethod, name: str, members: list[tuple[Adapter, float]], *, alpha: float, **context: Any
) -> tuple[Any, Any, int, float, bool]:
    """One module combined by ``spec``: its PEFT-shaped A and B (float32, scale alpha / k), k, the error, and
    whether the combined update is zero (below :data:`ZERO_TOLERANCE` of the weighted inputs' norms)."""
    from lora_ops import rescale

    factors = [a.factors(name) for a, _ in members]
    with module_errors(", ".join(str(a.path) for a, _ in members), name):
        combined = spec.combine(factors, [w for _, w in members], alpha=alpha, **context)
    result, err = combined.factors, float(combined.rel_error)
    if result.shape != factors[0].shape or result.A.dim() != 2 or result.rank < 1:
        raise PluginError(
            f"combine method {spec.name!r} (plugin {spec.plugin!r}) returned factors of shape "
            f"{tuple(result.B.shape)} x {tuple(result.A.shape)} for module {name}, an update of {factors[0].shape}"
        )
    k = result.rank
    if result.scale != alpha / k:
        with module_errors(", ".join(str(a.path) for a, _ in members), name):
            result = rescale(result, alpha / k)
    a_out, b_out = result.A.float(), result.B.float()
    norm_in = sum(abs(w) * _norm(f.A, f.B, f.scale) for f, (_, w) in zip(factors, members, strict=True))
    is_zero = _norm(a_out, b_out, result.scale) <= ZERO_TOLERANCE * norm_in
    module = members[0][0].modules[name]
    if module.kind == "conv":  # factors were flattened: A back to (k, in, kh, kw), B to (out, k, 1, 1)
        a_out = a_out.reshape(a_out.shape[0], *module.A.shape[1:])
        b_out = b_out.reshape(b_out.shape[0], b_out.shape[1], 1, 1)
    return a_out.contiguous(), b_out.contiguous(), k, err, is_zero
