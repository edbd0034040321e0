"""`adapters extract`."""

from __future__ import annotations

from dataclasses import asdict

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import complete_paths, json_option, output_options, rank_rule_options, token_option


@click.command("extract")
@click.option(
    "--base",
    "base",
    required=True,
    metavar="BASE",
    shell_complete=complete_paths,
    help="The checkpoint that was fine-tuned: a folder (safetensors, single or sharded) or a store ref.",
)
@click.option(
    "--tuned",
    required=True,
    metavar="TUNED",
    shell_complete=complete_paths,
    help="The full fine-tune of BASE: a folder or a store ref (its shard layout may differ from BASE's).",
)
@rank_rule_options
@click.option(
    "--targets",
    metavar="PATTERN",
    help="Extract only these modules: names (q_proj,v_proj: the name or its ending) or a regex over full module "
    "names. Default: every changed 2-D and conv weight.",
)
@click.option(
    "--embeddings",
    type=click.Choice(["lora", "save", "skip"]),
    default="skip",
    show_default=True,
    help="Changed input embeddings and lm_head: a LoRA on them, a full copy (modules_to_save), or left out with a "
    "warning.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the differences and SVDs are computed: cpu, cuda, cuda:N.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "exact", "randomized"]),
    default="auto",
    show_default=True,
    help="exact: dense float64 SVD; randomized: seeded sketch + power iterations; auto: exact for small matrices.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD's sketch.")
@output_options
@token_option
@json_option
def extract_cmd(
    base: str,
    tuned: str,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    sv_fro: float | None,
    max_rank: int | None,
    targets: str | None,
    embeddings: str,
    device: str,
    method: str,
    seed: int,
    output: str,
    overwrite: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Extract a LoRA adapter from a full fine-tune: per weight, the truncated SVD of TUNED - BASE.

    Give exactly one rule: --rank, --energy, --sv-ratio or --sv-fro (--max-rank caps the last three). Each
    changed Linear / Conv1D / Conv2d weight: dW = W_tuned - W_base in float32, then an exact (float64, small
    matrices) or randomized (seeded, large ones) truncated SVD, written as balanced factors with scale 1. Shows per
    module the rank, the method, ||dW||/||W||, the factors' relative error and the optimum at that rank (exact, or
    estimated for randomized). Other changed tensors (norms, biases, embeddings) are listed. The output is a PEFT
    folder that loads in PeftModel.from_pretrained.
    """
    warmup.start(device)  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    with out.progress("extracting") as update:
        result = api.extract(
            base,
            tuned,
            out=output,
            rank=rank,
            energy=energy,
            sv_ratio=sv_ratio,
            sv_fro=sv_fro,
            max_rank=max_rank,
            targets=targets,
            embeddings=embeddings,  # type: ignore[arg-type]
            device=device,
            method=method,
            seed=seed,
            overwrite=overwrite,
            progress=update,
            token=token,
        )
    if as_json:
        out.json(
            {
                "path": str(result.path),
                "r": result.r,
                "rank_pattern": result.rank_pattern,
                "target_modules": result.target_modules,
                "modules_to_save": result.modules_to_save,
                "params": result.params,
                "unchanged": result.unchanged,
                "seconds": result.seconds,
                "warnings": result.warnings,
                "modules": [asdict(m) for m in result.modules],
                "changed": [asdict(c) for c in result.changed],
            }
        )
        return
    t = out.table(None, "module", "rank", "method", "|dW|/|W|", "relative error", "optimum")
    for m in result.modules:
        t.add_row(m.name, str(m.rank), m.method, f"{m.rel_change:.3e}", f"{m.rel_error:.3e}", f"{m.opt_rel_error:.3e}")
    out.print(t)
    if result.changed:
        c = out.table(None, "changed tensor", "|dW|/|W|", "action", "why")
        for ch in result.changed:
            c.add_row(ch.name, f"{ch.rel_change:.3e}", ch.action, ch.why)
        out.print(c)
    for w in result.warnings:
        out.warn(w)
    out.print(
        f"wrote {result.path}: r={result.r}, {len(result.rank_pattern)} rank_pattern entries, "
        f"{len(result.modules)} modules, {result.params:,} parameters, {result.unchanged} tensors unchanged, "
        f"max relative error {result.max_rel_error:.3e}"
    )
