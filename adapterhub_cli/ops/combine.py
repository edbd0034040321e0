"""Combining several adapters into one, module by module (one module's tensors in memory at a time).

``cat`` is exact: the weighted sum of the updates as one LoRA whose rank is the sum of the ranks.
``linear`` and ``svd`` are the same exact sum compressed to its optimal rank-k approximation (thin QR +
core SVD); unlike PEFT's ``linear``, which adds the A's and the B's separately and so creates cross terms
``B_i A_j``. ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` act element-wise on each module's
dense update (d_out x d_in), then the result is compressed to rank k by a dense SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.preflight import require_valid
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.errors import IncompatibleBaseError, UsageError
from adapterhub_cli.formats.peft import peft_key, rank_layout, write_peft


EXACT_METHODS = ("cat", "linear", "svd")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = EXACT_METHODS + DENSE_METHODS


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
    path: Path
    method: str
    weights: list[float]
    r: int
    rank_pattern: dict[str, int]
    modules: list[ModuleCombination] = field(default_factory=list)


def check_compatible(adapters: list[Adapter], *, force: bool = False) -> None:
    """Refuse inputs that cannot be combined: a module with other shapes, other declared bases (unless
    ``force``), DoRA, non-linear LoRA layers, saved full modules, or disagreeing fan_in_fan_out."""
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
    seed: int = 0,
    force: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CombineResult:
    """Write one adapter whose update, per module, is the ``method`` combination of the inputs' updates."""
    import torch

    from lora_ops import concat, dense_merge, reduce_rank, rescale

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(adapters) < 1 or len(weights) != len(adapters):
        raise UsageError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if method in DENSE_METHODS and density is None:
        raise UsageError(f"--density is required for {method}")
    for a in adapters:
        require_valid(a)
    check_compatible(adapters, force=force)
    alpha = float(adapters[0].config.lora_alpha)
    generator = torch.Generator().manual_seed(seed)
    names = sorted({n for a in adapters for n in a.modules})
    tensors: dict[str, Any] = {}
    rows = []
    for i, name in enumerate(names):
        members = [(a.factors(name), w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        exact = concat([f for f, _ in members], [w for _, w in members])
        k_default = max(f.rank for f, _ in members)
        if method == "cat":
            result, k, err = rescale(exact, alpha / exact.rank), exact.rank, 0.0
        elif method in ("linear", "svd"):
            red = reduce_rank(exact, rank=rank or k_default, scale=lambda k: alpha / k)
            result, k, err = red.factors, red.rank, red.rel_error
        else:
            assert density is not None
            deltas = [w_f.scale * (w_f.B.float() @ w_f.A.float()) for w_f, _ in members]
            merged = dense_merge(deltas, [w for _, w in members], method, density=density, generator=generator)
            result, k, err = _dense_to_lora(merged, rank or k_default, alpha)
        a_out, b_out = result.A.float(), result.B.float()
        module = next(a.modules[name] for a in adapters if name in a.modules)
        if module.kind == "conv":  # factors were flattened: A back to (k, in, kh, kw), B to (out, k, 1, 1)
            a_out = a_out.reshape(a_out.shape[0], *module.A.shape[1:])
            b_out = b_out.reshape(b_out.shape[0], b_out.shape[1], 1, 1)
        tensors[peft_key(name, "lora_A")] = a_out.contiguous()
        tensors[peft_key(name, "lora_B")] = b_out.contiguous()
        rows.append(ModuleCombination(name, len(members), k, err))
        if progress:
            progress(i + 1, len(names))
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
    params: dict[str, Any] = {"method": method, "weights": weights, "rank": rank, "density": density, "seed": seed}
    prov = provenance("combine", {k: v for k, v in params.items() if v is not None}, adapters)
    path = write_peft(out, config=config, tensors=tensors, provenance=prov, overwrite=overwrite)
    return CombineResult(path=path, method=method, weights=list(weights), r=r, rank_pattern=rank_pattern, modules=rows)


def _dense_to_lora(delta: Any, k: int, alpha: float) -> tuple[Any, int, float]:
    """Optimal rank-k factors of a dense (d_out, d_in) update with scale alpha / k, and the relative error."""
    import torch

    from lora_ops import LoraFactors

    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = max(1, min(k, s.numel()))
    root = (s[:k] / (alpha / k)).sqrt()
    total = float(s.square().sum())
    err = 0.0 if total == 0 else math.sqrt(float(s[k:].square().sum()) / total)
    return LoraFactors(A=root[:, None] * vh[:k], B=u[:, :k] * root, scale=alpha / k), k, err
