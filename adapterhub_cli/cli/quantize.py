"""`adapters quantize` and `adapters dequantize`."""

from __future__ import annotations

from dataclasses import asdict

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import base_option, complete_paths, json_option, output_options, token_option


@click.command("quantize")
@click.argument("adapter", shell_complete=complete_paths)
@click.option(
    "--to",
    "scheme",
    type=click.Choice(["int8", "fp8", "nf4", "bf16", "fp16"]),
    required=True,
    help="int8 / fp8: one float32 scale per block; nf4: bitsandbytes 4-bit; bf16 / fp16: a cast.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Values per scale: 1 to 65536 for int8 / fp8, a power of two from 32 to 4096 for nf4 (a bf16 / fp16 cast "
    "has none).  [default: 64]",
)
@output_options
@base_option
@token_option
@json_option
def quantize_cmd(
    adapter: str,
    scheme: str,
    block_size: int | None,
    output: str,
    overwrite: bool,
    base: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Store ADAPTER's factors quantized; report the size and each module's relative update error."""
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    with out.progress("quantizing") as update:
        r = api.quantize(
            adapter,
            output,
            scheme=scheme,
            block_size=block_size,
            overwrite=overwrite,
            progress=update,
            token=token,
            base=base,
        )
    if as_json:
        out.json(
            {
                "path": str(r.path),
                "scheme": r.scheme,
                "block_size": r.block_size,
                "bytes_before": r.bytes_before,
                "bytes_after": r.bytes_after,
                "ratio": r.ratio,
                "file_size": r.file_size,
                "modules": [asdict(m) for m in r.modules],
            }
        )
        return
    t = out.table(None, "module", "bytes", "relative error of dW")
    for m in r.modules:
        t.add_row(m.name, f"{m.bytes_before:,} -> {m.bytes_after:,}", f"{m.rel_error:.3e}")
    out.print(t)
    out.print(
        f"wrote {r.path}: {r.scheme}, factors {r.bytes_before:,} -> {r.bytes_after:,} bytes ({r.ratio:.2f}x "
        f"smaller), max relative error {r.max_rel_error:.3e}"
    )


@click.command("dequantize")
@click.argument("adapter", shell_complete=complete_paths)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Dtype of the written factors.",
)
@output_options
@base_option
@token_option
@json_option
def dequantize_cmd(
    adapter: str, dtype: str, output: str, overwrite: bool, base: str | None, token: str | None, as_json: bool
) -> None:
    """Turn an ADAPTER that `adapters quantize` wrote (int8, fp8, nf4, or a bf16 / fp16 cast) back into a plain
    PEFT adapter (loads in PeftModel.from_pretrained)."""
    warmup.start()  # torch imports meanwhile (:mod:`adapterhub_cli.warmup`)
    from adapterhub_cli import api

    path = api.dequantize(adapter, output, overwrite=overwrite, dtype=dtype, token=token, base=base)
    if as_json:
        out.json({"path": str(path)})
    else:
        out.print(f"wrote {path}")
