"""What the factor math refuses for one module, said as this package's error: naming the input and the module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from adapterhub_cli.errors import InvalidAdapterError


@contextlib.contextmanager
def module_errors(inputs: str, module: str) -> Iterator[None]:
    """Turn what the factor math refuses for one module into an :class:`InvalidAdapterError` naming ``inputs``
    (the adapter files) and ``module``: :mod:`lora_ops`' own errors (a non-finite update, a scale it cannot use)
    and torch's ``LinAlgError`` (an SVD that does not converge, on finite values too extreme for it)."""
    try:
        yield
    except Exception as e:
        import torch

        from lora_ops.errors import LoraOpsError

        if not isinstance(e, LoraOpsError | torch.linalg.LinAlgError):
            raise
        raise InvalidAdapterError(
            f"{inputs}: module {module}: {e}",
            module=module,
            hint="check the adapter's lora_alpha and factors (`adapters validate`, `adapters inspect --modules`)",
        ) from e


__all__ = ["module_errors"]
