"""`adapters rank-histogram ADAPTER`: how many modules have each rank (a quick look at rank_pattern)."""

from __future__ import annotations

import json
from collections import Counter

import click


@click.command("rank-histogram")
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rank_histogram(adapter: str, as_json: bool) -> None:
    """Count ADAPTER's modules by rank (example plugin)."""
    import adapterhub_cli as ah

    loaded = ah.load(adapter)
    counts = Counter(m.rank for m in loaded.modules.values())
    if as_json:
        click.echo(json.dumps({"adapter": adapter, "ranks": {str(r): n for r, n in sorted(counts.items())}}))
        return
    width = max(counts.values())
    for rank, n in sorted(counts.items()):
        click.echo(f"rank {rank:>4}  {n:>5}  {'#' * max(1, round(40 * n / width))}")
