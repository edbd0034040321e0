"""`adapters demo`: build a tiny base and adapter locally and run the commands on them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from adapterhub_cli.cli._output import out


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
    """Build a tiny Llama-style base and a LoRA adapter (no download) and run inspect and validate on them."""
    import warnings

    from adapterhub_cli.cli.inspect import inspect_cmd
    from adapterhub_cli.cli.validate import validate_cmd
    from adapterhub_cli.demo import build_demo

    root = directory or Path(tempfile.mkdtemp(prefix="adapters-demo-"))
    out.print(f"[bold]Building a tiny base model and a LoRA adapter in {root}[/bold]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, adapter = build_demo(root)
    steps = [
        (f"adapters inspect {adapter} --modules --spectrum", inspect_cmd, [str(adapter), "--modules", "--spectrum"]),
        (f"adapters validate {adapter} --base {base}", validate_cmd, [str(adapter), "--base", str(base)]),
    ]
    for title, cmd, args in steps:
        out.print(f"\n[bold cyan]$ {title}[/bold cyan]")
        ctx.invoke(cmd, **cmd.make_context(cmd.name, args, parent=ctx).params)
    out.print(f"\nThe example stays in {root}; try `adapters inspect {adapter} --json`.")
