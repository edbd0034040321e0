"""`adapters analyze`."""

from __future__ import annotations

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import complete_paths, json_option, token_option


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


@click.command("analyze")
@click.argument("adapter", shell_complete=complete_paths)
@click.option(
    "--base",
    required=True,
    metavar="BASE",
    shell_complete=complete_paths,
    help="The base checkpoint the adapter adapts: a folder (config.json + safetensors, single or sharded) or a store "
    "ref (org/name@rev, each weight read by range requests); a local one also maps a kohya file's names.",
)
@click.option(
    "--base-top",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="Also the overlap of each update's singular subspaces with W's top-K ones (output and input side, with "
    "their random baselines), from a seeded randomized SVD of W (exact for small weights).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD of --base-top.")
@click.option(
    "--plot",
    default=None,
    metavar="FILE.png",
    shell_complete=complete_paths,
    help="Also write a PNG of the per-layer relative update and amplification by module family (needs "
    "matplotlib: pip install 'adapterhub-cli[plot]').",
)
@click.option("--overwrite", is_flag=True, help="Replace the --plot file if adapters analyze wrote it.")
@token_option
@json_option
def analyze_cmd(
    adapter: str,
    base: str,
    base_top: int | None,
    seed: int,
    plot: str | None,
    overwrite: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Measure an adapter against its base, module by module (LoRA paper, section 7).

    Per module: the relative update ||dW||/||W|| (rel), its cosine with W, the amplification ||dW||/||Uᵀ W V|| (U,
    V: dW's top singular vectors), how much more dW's directions are emphasised by W than random ones (align/rand,
    about 1 for unrelated directions) and DoRA's mean change of row magnitude (dM) and direction (dD, 1 - cos);
    then the same pooled per module family and per layer.

    Each base weight is read once in row blocks and met with the factors (O(m n r) per module, the dense update is
    never formed). Zero updates (B = 0) are reported as such, their ratios null. --json gives every number (also
    the singular values, per-direction u_iᵀ W v_i, the random baseline random_proj and, for DoRA, dora_rel_fro).

    ADAPTER is an adapter folder or file, or a store ref.
    """
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    with out.progress("analyzing") as update:
        report = api.analyze(
            adapter,
            base=base,
            base_top=base_top,
            seed=seed,
            plot=plot,
            overwrite=overwrite,
            token=token,
            progress=update,
        )
    if as_json:
        out.json(report.to_dict())
        return
    out.print(
        out.key_values(
            [
                ("adapter", report.adapter),
                ("base", report.base),
                ("modules", len(report.modules)),
                ("training state", report.training_state),
                *([("plot", plot)] if plot else []),
            ]
        )
    )
    for note in report.notes:
        out.print(note)
    columns = ["module", "rel", "cos_W", "amplif.", "align/rand", "dM", "dD"]
    t = out.table("modules (rel = ||dW||/||W||, amplif. = ||dW||/||UᵀWV||)", *columns)
    for m in report.modules:
        cells = [
            m.module,
            _num(m.rel_fro),
            _num(m.cos_W, ".2g"),
            _num(m.amplification),
            _num(m.alignment_over_random),
            _num(m.dM),
            _num(m.dD),
        ]
        if m.reason == "zero_update":
            cells[3] = "zero update"
        t.add_row(*cells)
    out.print(t)
    if base_top is not None:
        b = out.table(
            f"overlap with W's top-{base_top} singular subspaces (random: what random directions would give)",
            "module",
            "out",
            "random out",
            "in",
            "random in",
            "σ1(dW)/σ1(W)",
        )
        for m in report.modules:
            top = m.base_top or {}
            b.add_row(
                m.module,
                _num(top.get("overlap_out")),
                _num(top.get("random_out")),
                _num(top.get("overlap_in")),
                _num(top.get("random_in")),
                _num(top.get("spec_rel")),
            )
        out.print(b)
    for title, groups, key in (
        ("by module family", report.families, "family"),
        ("by layer", report.layers, "layer"),
    ):
        if not groups:
            continue
        g = out.table(
            f"{title} (rel pooled; amplif., align/rand medians; dM, dD means)",
            key,
            "modules",
            "rel",
            "amplif.",
            "align/rand",
            "dM",
            "dD",
        )
        for s in groups:
            g.add_row(
                s.name,
                str(s.modules) + (f" ({s.zero_updates} zero)" if s.zero_updates else ""),
                _num(s.rel_fro),
                _num(s.amplification),
                _num(s.alignment_over_random),
                _num(s.dM),
                _num(s.dD),
            )
        out.print(g)
