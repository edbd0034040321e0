"""Compare two adapters: config differences, module sets, and per shared module how the updates relate.

Every number comes from the factors (``<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ))``, QR + core SVD for
norms and distances), never from dense d_out x d_in matrices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.factor_errors import module_errors
from adapterhub_cli.errors import IncompatibleBaseError


#: Config fields compared by ``diff``.
COMPARED_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "base_model_name_or_path",
    "revision",
    "bias",
    "task_type",
)
#: Relative distance under which two updates count as identical, by storage dtype (a bf16 round trip moves
#: an update by about 2e-3).
IDENTICAL_TOL = {"F64": 1e-9, "F32": 1e-5, "F16": 1e-2, "BF16": 1e-2}


@dataclass(frozen=True)
class ConfigChange:
    key: str
    a: Any
    b: Any


@dataclass(frozen=True)
class ModuleDiff:
    """How the update of one module in B relates to the one in A.

    ``rel_distance`` is ``||dW_B - dW_A|| / ||dW_A||`` (None when dW_A is zero); ``subspace_overlap`` is in
    [0, 1] (see :func:`lora_ops.subspace_overlap`); ``cosine`` and the overlap are None for a zero update.
    """

    name: str
    rank_a: int
    rank_b: int
    norm_a: float
    norm_b: float
    cosine: float | None
    rel_distance: float | None
    subspace_overlap: float | None


@dataclass
class DiffReport:
    """Everything ``adapters diff`` shows; ``verdict`` is "identical", "scaled copy" or "different"."""

    a: str
    b: str
    config_changes: list[ConfigChange]
    only_in_a: list[str]
    only_in_b: list[str]
    modules: list[ModuleDiff]
    verdict: str
    summary: str
    tolerance: float
    scale_factor: float | None = None
    saved_tensor_changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config_value(adapter: Adapter, key: str) -> Any:
    value = getattr(adapter.config, key, None)
    return sorted(value) if isinstance(value, list) else value


def diff_adapters(a: Adapter, b: Adapter) -> DiffReport:
    """Compare ``a`` and ``b``; the verdict tolerance follows the coarser storage dtype of the two."""
    from lora_ops import cosine, distance, norm, subspace_overlap

    changes = [
        ConfigChange(k, _config_value(a, k), _config_value(b, k))
        for k in COMPARED_KEYS
        if _config_value(a, k) != _config_value(b, k)
    ]
    shared = [n for n in a.modules if n in b.modules]
    for name in shared:
        ma, mb = a.modules[name], b.modules[name]
        if (ma.d_out, ma.d_in) != (mb.d_out, mb.d_in):
            raise IncompatibleBaseError(
                f"module {name} is {ma.d_out} x {ma.d_in} in {a.path} but {mb.d_out} x {mb.d_in} in {b.path}: the "
                "adapters are for different base models and their updates cannot be compared"
            )
    rows = []
    for name in shared:
        fa, fb = a.factors(name, finite=True), b.factors(name, finite=True)
        with module_errors(f"{a.path}, {b.path}", name):
            na, nb = norm(fa), norm(fb)
            dist = distance(fa, fb)
            rows.append(
                ModuleDiff(
                    name=name,
                    rank_a=a.modules[name].rank,
                    rank_b=b.modules[name].rank,
                    norm_a=na,
                    norm_b=nb,
                    cosine=cosine(fa, fb),
                    rel_distance=(dist / na) if na > 0 else (0.0 if nb == 0 else None),
                    subspace_overlap=subspace_overlap(fa, fb),
                )
            )
    rows.sort(key=lambda m: -1.0 if m.rel_distance is None else m.rel_distance, reverse=True)
    tol = max(IDENTICAL_TOL.get(t.dtype, 1e-2) for t in a.all_tensor_infos() + b.all_tensor_infos())
    saved = _saved_tensor_changes(a, b, tol)
    report = DiffReport(
        a=str(a.path),
        b=str(b.path),
        config_changes=changes,
        only_in_a=sorted(set(a.modules) - set(b.modules)),
        only_in_b=sorted(set(b.modules) - set(a.modules)),
        modules=rows,
        verdict="different",
        summary="",
        tolerance=tol,
        saved_tensor_changes=saved,
    )
    _judge(report)
    return report


def _saved_tensor_changes(a: Adapter, b: Adapter, tol: float) -> list[str]:
    """Names of modules_to_save / other saved tensors that are missing on one side or differ beyond ``tol``."""
    names = sorted(set(a.extra_tensors) | set(b.extra_tensors))
    changed = [n for n in names if n not in a.extra_tensors or n not in b.extra_tensors]
    common = [n for n in names if n in a.extra_tensors and n in b.extra_tensors]
    if common:
        ta = a.source.load([a.extra_tensors[n].name for n in common])
        tb = b.source.load([b.extra_tensors[n].name for n in common])
        for n in common:
            x, y = ta[a.extra_tensors[n].name].double(), tb[b.extra_tensors[n].name].double()
            if x.shape != y.shape or float((x - y).norm()) > tol * max(float(x.norm()), 1e-30):
                changed.append(n)
    return sorted(changed)


def _judge(r: DiffReport) -> None:
    n = len(r.modules)
    if r.only_in_a or r.only_in_b:
        r.summary = f"module sets differ: {len(r.only_in_a)} only in A, {len(r.only_in_b)} only in B; {n} shared"
        return
    if r.saved_tensor_changes:
        r.summary = f"saved tensors differ: {', '.join(r.saved_tensor_changes[:3])}"
        return
    close = [m for m in r.modules if m.rel_distance is not None and m.rel_distance <= r.tolerance]
    if len(close) == n:
        r.verdict, r.summary = "identical", f"all {n} module updates agree within {r.tolerance:g} (relative)"
        return
    ratios = [m.norm_b / m.norm_a for m in r.modules if m.norm_a > 0]
    aligned = all(m.cosine is not None and m.cosine >= 1 - r.tolerance for m in r.modules)
    if aligned and ratios and max(ratios) - min(ratios) <= r.tolerance * max(ratios):
        c = sum(ratios) / len(ratios)
        r.verdict, r.scale_factor = "scaled copy", c
        r.summary = f"every update of B is {c:.6g} x the one of A"
        return
    worst = r.modules[0]
    dist = "undefined (zero in A)" if worst.rel_distance is None else f"{worst.rel_distance:.3g}"
    r.summary = f"{n - len(close)} of {n} modules differ; most: {worst.name} (relative distance {dist})"
