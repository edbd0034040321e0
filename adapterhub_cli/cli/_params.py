"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept a legacy adapter_model.bin (read with torch.load(weights_only=True), never arbitrary pickles).",
)
existing_path = click.Path(path_type=str)


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output`` (required) and ``--overwrite`` for commands that write an adapter."""
    f = click.option(
        "--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete)."
    )(f)
    return click.option("-o", "--output", required=True, help="Output folder (written atomically).")(f)


def parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """Click callback: ``"0.7,0.3"`` -> ``[0.7, 0.3]``."""
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
