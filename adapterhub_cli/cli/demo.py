"""`adapters demo`: build a tiny base and adapter locally and run the commands on them."""

from __future__ import annotations

import shlex
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
    """Build a tiny Llama-style base and a LoRA adapter (no download) and run the commands on them.

    Each command is echoed on one line (``$ adapters ...``, quoted for the shell), so it can be copied from a
    terminal, a pipe or a file; third-party progress bars and warnings are kept out of the output.
    """
    from adapterhub_cli.artifact.files import follow_umask
    from adapterhub_cli.ops.demo import build_demo, quiet_third_party

    root = directory
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="adapters-demo-"))
        follow_umask(root)  # mkdtemp's folder is private (0o700); the demo's files are the user's like any output
    out.print(styled((f"Building a tiny base model and a LoRA adapter in {root}", "bold")), wrap=False)
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
        out.print(styled("\n", (f"$ adapters {shlex.join(args)}", "bold cyan")), wrap=False)
        cmd = group.get_command(ctx, args[0])
        assert cmd is not None
        # the command's own parsed context, so it knows which options were given (not defaults)
        with quiet_third_party(), cmd.make_context(args[0], args[1:], parent=ctx) as sub:
            cmd.invoke(sub)
    out.print(f"\nThe example stays in {root}; try `adapters inspect {shlex.quote(str(adapter))} --json`.", wrap=False)
