"""`adapters reduce`."""

from __future__ import annotations

from dataclasses import asdict

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import (
    base_option,
    complete_paths,
    json_option,
    output_options,
    rank_rule_options,
    token_option,
)


@click.command("reduce")
@click.argument("adapter", shell_complete=complete_paths)
@rank_rule_options
@output_options
@base_option
@token_option
@json_option
def reduce_cmd(
    adapter: str,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    sv_fro: float | None,
    max_rank: int | None,
    output: str,
    overwrite: bool,
    base: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Rank-reduce ADAPTER by SVD of each update, exactly (Eckart-Young optimal) and without dense matrices.

    Give exactly one rule: --rank, --energy, --sv-ratio or --sv-fro (--max-rank caps the last three). Each
    module: thin QR of B and Aᵀ, SVD of the r x r core, keep the top k. The output is a PEFT folder (per-module
    ranks in rank_pattern) that loads in PeftModel.from_pretrained unchanged. A rule that keeps every rank says
    so (nothing was reduced); --rank not below any module's rank is refused.
    """
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    with out.progress("reducing") as update:
        result = api.reduce(
            adapter,
            output,
            rank=rank,
            energy=energy,
            sv_ratio=sv_ratio,
            sv_fro=sv_fro,
            max_rank=max_rank,
            overwrite=overwrite,
            progress=update,
            token=token,
            base=base,
        )
    if as_json:
        out.json(
            {
                "path": str(result.path),
                "r": result.r,
                "rank_pattern": result.rank_pattern,
                "params_before": result.params_before,
                "params_after": result.params_after,
                "seconds": result.seconds,
                "unchanged": result.unchanged,
                "warnings": result.warnings,
                "modules": [asdict(m) for m in result.modules],
            }
        )
        return
    t = out.table(None, "module", "rank", "retained energy", "relative error")
    for m in result.modules:
        t.add_row(m.name, f"{m.rank_before} -> {m.rank_after}", f"{m.retained_energy:.6f}", f"{m.rel_error:.3e}")
    out.print(t)
    for w in result.warnings:
        out.warn(w)
    out.print(
        f"wrote {result.path}: r={result.r}, {len(result.rank_pattern)} rank_pattern entries, "
        f"{result.params_before:,} -> {result.params_after:,} parameters, "
        f"max relative error {result.max_rel_error:.3e}"
    )
