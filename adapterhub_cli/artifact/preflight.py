"""The checks every writing operation runs on its inputs before it writes anything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import BaseView, open_base
from adapterhub_cli.artifact.safetensors import all_finite
from adapterhub_cli.artifact.validate import (
    Finding,
    _check_factor_shapes,
    _check_overflow,
    _check_ranks,
    _check_weights,
    check_config,
    largest_magnitude,
    validate_against,
)
from adapterhub_cli.errors import IncompatibleBaseError, InvalidAdapterError


def _summary(findings: list[Finding]) -> str:
    first = findings[0]
    where = f" [{first.module}]" if first.module else ""
    more = f" (and {len(findings) - 1} more error(s); run `adapters validate` for all)" if len(findings) > 1 else ""
    return f"{first.code}{where}: {first.message}{more}"


def require_finite(adapter: Adapter, tensors: dict[str, Any]) -> None:
    """Raise :class:`InvalidAdapterError` if any of ``tensors`` (stored key -> tensor) holds NaN or inf.

    Operations that load every tensor anyway call this on what they loaded instead of reading twice.
    """
    for key, t in tensors.items():
        if not all_finite(t):
            raise InvalidAdapterError(
                f"non-finite: tensor {key} holds NaN or inf values",
                path=adapter.path,
                module=key,
                hint="training diverged or the file is damaged; do not ship it",
            )


def require_no_overflow(adapter: Adapter, tensors: dict[str, Any] | None = None) -> None:
    """Raise :class:`InvalidAdapterError` for validate's ``update-overflow``: a module whose finite factors give an
    update ``scale * B @ A`` beyond float32's range (PEFT computes inf). For operations that write the factors
    unchanged in substance (convert, dequantize) and so skip :func:`require_valid`'s weight pass: ``tensors`` are
    the factors they loaded already (stored key -> tensor); any other factor is loaded here, one at a time.
    Non-finite factors are left to the caller's own check."""
    amax: dict[str, float] = {}
    stored = {info.name for info in adapter.all_tensor_infos()}
    for m in adapter.modules.values():
        for key in (m.A.name, m.B.name):
            if key not in stored:  # (a factor some formats compose from others: validate skips it too)
                continue
            t = tensors[key] if tensors is not None and key in tensors else adapter.source.load([key])[key]
            if t.is_floating_point() and t.numel():
                largest = largest_magnitude(t)
                if math.isfinite(largest):
                    amax[key] = largest
    errors = _check_overflow(adapter, amax)
    if errors:
        raise InvalidAdapterError(_summary(errors), path=adapter.path, module=errors[0].module)


def require_valid(adapter: Adapter, *, base: BaseView | str | Path | None = None, check_weights: bool = True) -> None:
    """Raise when ``adapter`` has error-level findings: alone (the scaling values of its config, the factors'
    shapes, ranks, finite tensors) or against ``base`` if given. Every writing command calls this before it writes.

    ``check_weights=False`` skips loading the tensors for the NaN / inf check (for callers that check what
    they load with :func:`require_finite`).

    Raises:
        InvalidAdapterError: the adapter is inconsistent or holds NaN / inf.
        IncompatibleBaseError: the adapter does not fit ``base``.
    """
    if base is not None:
        view = base if isinstance(base, BaseView) else open_base(base)
        errors = validate_against(adapter, view, check_weights=check_weights).errors
        if errors:
            raise IncompatibleBaseError(
                f"{adapter.path} does not fit {view.path}: {_summary(errors)}",
                findings=errors,
                hint="fix the adapter or choose the base it was trained on",
            )
        return
    findings = check_config(adapter) + _check_factor_shapes(adapter) + _check_ranks(adapter)
    findings += _check_weights(adapter) if check_weights else []
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise InvalidAdapterError(_summary(errors), path=adapter.path, module=errors[0].module)
