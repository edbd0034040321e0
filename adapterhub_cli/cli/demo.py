"""`adapters demo`: build a tiny base and adapter locally and run the commands on them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from adapterhub_cli.cli._output import out, styled


@click.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the example base and adapter (default: a temporary folder).",
)
@click.pass_context
def demo_cmd(ctx: click.Context, directory: Path | None) -> None:
    """Build a tiny Llama-style base and a LoRA adapter (no download) and run the commands on them."""
    import warnings

    from adapterhub_cli.ops.demo import build_demo

    root = directory or Path(tempfile.mkdtemp(prefix="adapters-demo-"))
    out.print(styled((f"Building a tiny base model and a LoRA adapter in {root}", "bold")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, adapter = build_demo(root)
    a, reduced = str(adapter), str(root / "reduced")
    steps = [
        ["inspect", a, "--modules", "--spectrum"],
        ["validate", a, "--base", str(base)],
        ["reduce", a, "--energy", "0.9", "-o", reduced, "--overwrite"],
        ["diff", a, reduced, "--top", "3"],
        [
            "combine",
            a,
            reduced,
            "--weights",
            "1,-1",
            "--method",
            "svd",
            "--rank",
            "2",
            "-o",
            str(root / "residual"),
            "--overwrite",
        ],
        ["quantize", a, "--to", "int8", "-o", str(root / "int8"), "--overwrite"],
        ["merge", a, "--into", str(base), "-o", str(root / "merged"), "--overwrite"],
    ]
    group = ctx.parent.command if ctx.parent else None
    assert isinstance(group, click.Group)
    for args in steps:
        out.print(styled("\n", (f"$ adapters {' '.join(args)}", "bold cyan")))
        cmd = group.get_command(ctx, args[0])
        assert cmd is not None
        ctx.invoke(cmd, **cmd.make_context(args[0], args[1:], parent=ctx).params)
    out.print(f"\nThe example stays in {root}; try `adapters inspect {adapter} --json`.")
