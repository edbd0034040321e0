"""`adapters validate`."""

from __future__ import annotations

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out, styled
from adapterhub_cli.cli._params import allow_pickle_option, complete_paths, json_option, token_option


_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


@click.command("validate")
@click.argument("adapter", shell_complete=complete_paths)
@click.option(
    "--base",
    required=True,
    metavar="BASE",
    shell_complete=complete_paths,
    help="Base checkpoint to check against: a folder (config.json + safetensors, single or sharded) or a store ref "
    "(org/name@rev); a local one also maps a kohya file's names to modules.",
)
@click.option(
    "--target",
    "targets",
    type=click.Choice(["gguf", "vllm"]),
    multiple=True,
    help="Also check what a serving stack would refuse or silently lose: gguf (llama.cpp's converter and loader), "
    "vllm (vLLM's LoRA loader). Repeatable.",
)
@click.option("--gguf", is_flag=True, help="The same as --target gguf.")
@click.option(
    "--max-lora-rank",
    type=click.IntRange(min=1),
    default=None,
    help="vLLM's --max-lora-rank for --target vllm (default 16, vLLM's default).",
)
@click.option(
    "--lora-target-modules",
    "lora_target_modules",
    multiple=True,
    help="vLLM's --lora-target-modules for --target vllm (comma-separated or repeated): adapter modules outside "
    "it are reported as silently dropped.",
)
@click.option("--no-weights", is_flag=True, help="Skip loading the adapter's tensors (no NaN / inf check).")
@allow_pickle_option
@token_option
@json_option
def validate_cmd(
    adapter: str,
    base: str,
    targets: tuple[str, ...],
    gguf: bool,
    max_lora_rank: int | None,
    lora_target_modules: tuple[str, ...],
    no_weights: bool,
    allow_pickle: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Check that ADAPTER fits the base model: targets, shapes, ranks, modules_to_save, declared base, NaN.

    With --target gguf (or --gguf), also what llama.cpp's convert_lora_to_gguf.py and loader would refuse or
    silently lose (`adapters convert --to gguf` fixes the scale findings); with --target vllm, what vLLM's LoRA
    loader would.

    Reads the base's config and tensor headers only. Exit status 0 when no error was found, 1 when
    errors were found, 2 for bad input.
    """
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    lora = api.load(adapter, allow_pickle=allow_pickle, strict=False, token=token, base=base)
    wanted = [m.strip() for item in lora_target_modules for m in item.split(",") if m.strip()]
    report = api.validate(
        lora,
        base=base,
        check_weights=not no_weights,
        gguf=gguf,
        target=list(targets),
        max_lora_rank=max_lora_rank,
        lora_target_modules=wanted or None,
        token=token,
    )
    if as_json:
        out.json(
            {
                "adapter": report.adapter,
                "base": report.base,
                "ok": report.ok,
                "findings": [vars(f) for f in report.findings],
            }
        )
    else:
        if report.findings:
            t = out.table(None, "severity", "code", "module", "what to do", wrap_last=True)
            for f in report.findings:
                t.add_row(styled((f.severity, _STYLE[f.severity])), f.code, f.module or "", f.message)
            out.print(t)
        n_err, n_warn = len(report.errors), len(report.warnings)
        summary = f" ({n_warn} warning(s)); {len(lora.modules)} modules checked against {report.base}"
        if report.ok:
            out.print(styled(("OK", "green"), ": the adapter fits the base", summary))
        else:
            out.print(styled((f"{n_err} error(s)", "bold red"), summary))
    if not report.ok:
        raise click.exceptions.Exit(1)
