"""`adapters combine`."""

from __future__ import annotations

from dataclasses import asdict

import click

from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import json_option, method_choice, output_options, parse_weights


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "--weights",
    callback=parse_weights,
    help="Comma-separated weights, one per adapter (default 1 each; negative subtracts).",
)
@click.option(
    "--method",
    type=method_choice(),
    default="cat",
    show_default=True,
    help="cat: exact sum (rank = sum of ranks). linear / svd: the exact sum compressed optimally to "
    "--rank. ties / dare_linear / dare_ties / magnitude_prune: element-wise per module, then rank k. "
    "Plugins add more; `adapters plugins` lists every method with its options and reference.",
)
@click.option("--rank", type=click.IntRange(min=1), help="Output rank (default: the largest input rank).")
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    help="Fraction of entries kept by ties / dare / magnitude_prune (and methods that take it).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop.")
@click.option("--force", is_flag=True, help="Combine adapters that declare different base models.")
@output_options
@json_option
def combine_cmd(
    adapters: tuple[str, ...],
    weights: list[float] | None,
    method: str,
    rank: int | None,
    density: float | None,
    seed: int,
    force: bool,
    output: str,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Combine ADAPTERS into one adapter, module by module, over the union of their target modules."""
    from adapterhub_cli import api

    if weights is not None and len(weights) != len(adapters):
        raise click.BadParameter(f"{len(weights)} weights for {len(adapters)} adapters", param_hint="--weights")
    with out.progress("combining") as update:
        result = api.combine(
            list(adapters),
            output,
            weights=weights,
            method=method,
            rank=rank,
            density=density,
            seed=seed,
            force=force,
            overwrite=overwrite,
            progress=update,
        )
    if as_json:
        out.json(
            {
                "path": str(result.path),
                "method": result.method,
                "weights": result.weights,
                "r": result.r,
                "rank_pattern": result.rank_pattern,
                "modules": [asdict(m) for m in result.modules],
            }
        )
        return
    t = out.table(None, "module", "inputs", "rank", "compression error")
    for m in result.modules:
        t.add_row(m.name, str(m.inputs), str(m.rank), f"{m.rel_error:.3e}")
    out.print(t)
    out.print(
        f"wrote {result.path}: {result.method} of {len(adapters)} adapters, weights {result.weights}, "
        f"r={result.r} ({len(result.rank_pattern)} rank_pattern entries)"
    )
