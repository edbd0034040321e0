"""Checks of the numeric options the operations take, so that a wrong type or value from the Python API (or a JOBS
file) is a :class:`~adapterhub_cli.errors.UsageError` naming the option, as the CLI spells it, not a ``TypeError``
from deep inside."""

from __future__ import annotations

import math

from adapterhub_cli.errors import UsageError


def require_whole(option: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> None:
    """Refuse ``value`` unless it is a whole number (an ``int``, not a ``bool``) from ``minimum`` to ``maximum``.

    Example:
        >>> require_whole("--rank", 4)
        >>> require_whole("--rank", 2.5)
        Traceback (most recent call last):
        ...
        adapterhub_cli.errors.UsageError: --rank 2.5: give a whole number >= 1
    """
    top = f" to {maximum}" if maximum is not None else ""
    wanted = f"from {minimum}{top}" if top else f">= {minimum}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{option} {value!r}: give a whole number {wanted}")
    if value < minimum or (maximum is not None and value > maximum):
        raise UsageError(f"{option} {value}: give a whole number {wanted}")


def require_real(option: str, value: object) -> float:
    """``value`` as a float, refused unless it is a finite number (an ``int`` or ``float``, not a ``bool``)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise UsageError(f"{option} {value!r}: give a finite number")
    return float(value)


#: the largest seed a torch generator takes
MAX_SEED = (1 << 63) - 1

__all__ = ["MAX_SEED", "require_real", "require_whole"]
