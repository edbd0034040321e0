"""`adapters convert`."""

from __future__ import annotations

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import (
    allow_pickle_option,
    base_option,
    complete_paths,
    json_option,
    token_option,
    writable_format_choice,
)


@click.command("convert")
@click.argument("adapter", shell_complete=complete_paths)
@click.option(
    "--to",
    "to",
    type=writable_format_choice(),
    required=True,
    help="Layout to write: a registered format that can write (plugins add more; `adapters plugins` lists them).",
)
@base_option
@click.option("--format", "fmt", metavar="FORMAT", help="Read ADAPTER as this format instead of detecting it.")
@click.option(
    "--fold-tucker",
    is_flag=True,
    help="Read a LyCORIS LoCon-Tucker file (lora_mid) as the LoRA it equals exactly, at the same rank.",
)
@click.option(
    "--fold-loha",
    is_flag=True,
    help="Read a LyCORIS LoHa file (hada_w1_a ...) as the LoRA of rank r1·r2 it equals exactly (needs --base).",
)
@click.option(
    "--strip-prefix",
    metavar="PREFIX",
    help="Remove PREFIX (e.g. `unet.`) from the start of every module name, so that PEFT matches the names on the "
    "base (`adapters validate` names the prefix when one makes them match).",
)
@click.option(
    "--add-prefix",
    metavar="PREFIX",
    help="Put PREFIX (e.g. `model.`) before every module name (after --strip-prefix).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="OUT",
    shell_complete=complete_paths,
    help="Output: a folder for peft and diffusers, a .safetensors file for kohya, what the format writes for "
    "others (written atomically).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT if adapters wrote it (an earlier output), only once the new one is complete.",
)
@allow_pickle_option
@token_option
@json_option
def convert_cmd(
    adapter: str,
    to: str,
    base: str | None,
    fmt: str | None,
    fold_tucker: bool,
    fold_loha: bool,
    strip_prefix: str | None,
    add_prefix: str | None,
    output: str,
    overwrite: bool,
    allow_pickle: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Convert ADAPTER between PEFT, kohya (sd-scripts), diffusers and plugin layouts, losslessly.

    Factors keep their bytes and dtypes and alpha stays its own scalar; names are mapped through the base
    model's own tensor names, checked by shape. `--to kohya` writes one .safetensors file; `--to peft` and
    `--to diffusers` write a folder.
    """
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    result = api.convert(
        adapter,
        output,
        to=to,
        base=base,
        format=fmt,
        overwrite=overwrite,
        fold_tucker=fold_tucker,
        fold_loha=fold_loha,
        strip_prefix=strip_prefix,
        add_prefix=add_prefix,
        token=token,
        allow_pickle=allow_pickle,
    )
    if as_json:
        out.json(
            {
                "path": str(result.path),
                "to": result.to,
                "from": result.source_format,
                "modules": result.modules,
                "warnings": result.warnings,
            }
        )
        return
    for w in result.warnings:
        out.warn(w)
    out.print(f"wrote {result.path} ({result.to}, {result.modules} modules, from {result.source_format})")
