"""`adapters diff`."""

from __future__ import annotations

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out, styled
from adapterhub_cli.cli._params import base_option, complete_paths, json_option, token_option


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


@click.command("diff")
@click.argument("a", shell_complete=complete_paths)
@click.argument("b", shell_complete=complete_paths)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Show this many modules, most different first (--json lists all).",
)
@click.option("--exit-code", is_flag=True, help="Exit 1 when the adapters are not identical (like git diff).")
@base_option
@token_option
@json_option
def diff_cmd(a: str, b: str, top: int, exit_code: bool, base: str | None, token: str | None, as_json: bool) -> None:
    """Compare adapters A and B: config, module sets, and per shared module the ranks, norms, cosine similarity,
    relative distance ||dW_B - dW_A|| / ||dW_A|| and top singular-subspace overlap, computed from the factors.

    A and B are adapter folders or files, or store refs. Shown: a table of the config keys that differ, the
    modules only in A or only in B, a table of the --top most different shared modules (r A/B, ||dW_A||,
    ||dW_B||, cosine, rel. distance, overlap), and the verdict: identical (every update equal within the
    storage dtype's rounding), scaled copy (B's updates are one constant times A's) or different.
    """
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    report = api.diff(a, b, token=token, base=base)
    if as_json:
        out.json(report.to_dict())
    else:
        if report.config_changes:
            t = out.table("config", "key", "A", "B", wrap_last=True)
            for c in report.config_changes:
                t.add_row(c.key, str(c.a), str(c.b))
            out.print(t)
        for side, names in (("A", report.only_in_a), ("B", report.only_in_b)):
            if names:
                out.print(
                    f"only in {side} ({len(names)}): " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                )
        if report.modules:
            t = out.table(
                "modules (most different first)",
                "module",
                "r A/B",
                "||dW_A||",
                "||dW_B||",
                "cosine",
                "rel. distance",
                "overlap",
            )
            for m in report.modules[:top]:
                t.add_row(
                    m.name,
                    f"{m.rank_a}/{m.rank_b}",
                    _num(m.norm_a),
                    _num(m.norm_b),
                    _num(m.cosine, ".6f"),
                    _num(m.rel_distance, ".3e"),
                    _num(m.subspace_overlap, ".4f"),
                )
            out.print(t)
        style = {"identical": "green", "scaled copy": "yellow"}.get(report.verdict, "red")
        out.print(styled((report.verdict, style), f": {report.summary}"))
    if exit_code and report.verdict != "identical":
        raise click.exceptions.Exit(1)
