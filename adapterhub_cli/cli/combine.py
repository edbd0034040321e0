"""`adapters combine`."""

from __future__ import annotations

from dataclasses import asdict

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import (
    LazyHelpOption,
    base_option,
    complete_paths,
    json_option,
    method_choice,
    methods_taking,
    output_options,
    token_option,
    weights_option,
)


def _rank_help() -> str:
    return (
        f"Output rank of {', '.join(methods_taking('rank'))} (default: the largest input rank). cat is exact "
        "(rank = the sum of the input ranks) and takes none."
    )


def _density_help() -> str:
    required = methods_taking("density", required=True)
    others = [m for m in methods_taking("density") if m not in required]
    also = f"; optional for {', '.join(others)}" if others else ""
    return (
        f"Fraction of each update's entries kept, in (0, 1]. Required by {', '.join(required) or 'no method'}{also}; "
        "other methods do not take it.  [default: none]"
    )


def _seed_help() -> str:
    return f"Seed of the random drop of {', '.join(methods_taking('seed')) or 'no method'}.  [default: 0]"


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, shell_complete=complete_paths)
@weights_option
@click.option(
    "--method",
    type=method_choice(),
    default="cat",
    show_default=True,
    help="cat: exact sum (rank = sum of ranks). linear / svd: the exact sum compressed optimally to "
    "--rank. ties / dare_linear / dare_ties / magnitude_prune: element-wise per module, then rank k. "
    "Plugins add more; `adapters plugins` lists every method with its options and reference.",
)
@click.option("--rank", cls=LazyHelpOption, help_text=_rank_help, type=click.IntRange(min=1), metavar="K")
@click.option("--density", cls=LazyHelpOption, help_text=_density_help, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", cls=LazyHelpOption, help_text=_seed_help, type=int, default=None)
@click.option("--force", is_flag=True, help="Combine adapters that declare different base models.")
@output_options
@base_option
@token_option
@json_option
def combine_cmd(
    adapters: tuple[str, ...],
    weights: list[float] | None,
    method: str,
    rank: int | None,
    density: float | None,
    seed: int | None,
    force: bool,
    output: str,
    overwrite: bool,
    base: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Combine ADAPTERS into one adapter, module by module, over the union of their target modules.

    An option the method does not use (--rank or --density with cat, --seed without a random drop) is refused;
    a result whose weighted inputs cancel (A A --weights 1,-1) is written with a warning.
    """
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

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
            token=token,
            base=base,
        )
    if as_json:
        out.json(
            {
                "path": str(result.path),
                "method": result.method,
                "weights": result.weights,
                "r": result.r,
                "rank_pattern": result.rank_pattern,
                "zero_modules": result.zero_modules,
                "warnings": result.warnings,
                "modules": [asdict(m) for m in result.modules],
            }
        )
        return
    t = out.table(None, "module", "inputs", "rank", "compression error")
    for m in result.modules:
        t.add_row(m.name, str(m.inputs), str(m.rank), f"{m.rel_error:.3e}")
    out.print(t)
    for w in result.warnings:
        out.warn(w)
    out.print(
        f"wrote {result.path}: {result.method} of {len(adapters)} adapters, weights {result.weights}, "
        f"r={result.r} ({len(result.rank_pattern)} rank_pattern entries)"
    )
