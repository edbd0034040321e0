"""`adapters merge` and `adapters unmerge`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import click

from adapterhub_cli import warmup
from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import complete_paths, json_option, output_options, token_option, weights_option


device_option = click.option(
    "--device", default="cpu", show_default=True, help="Where updates are computed: cpu, cuda, cuda:N."
)


def _shard_size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--max-shard-size``: a size above zero, checked at parse time (a usage error naming the option)."""
    from adapterhub_cli.errors import UsageError
    from adapterhub_cli.merge.plan import shard_limit

    try:
        shard_limit(value)
    except UsageError as e:
        raise click.BadParameter(f"{e}; give a positive size, e.g. 5GB or 500MB") from None
    return value


shard_option = click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    callback=_shard_size,
    metavar="SIZE",
    help="Largest output shard, e.g. 5GB or 500MB.",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default="auto",
    show_default=True,
    help="Output dtype of floating tensors (auto keeps the input's).",
)


def _report(result: object, as_json: bool, verb: str) -> None:
    data = asdict(result)  # type: ignore[call-overload]
    data["path"] = str(data["path"])
    if as_json:
        out.json(data)
        return
    for w in data["warnings"]:
        out.warn(w)
    out.print(
        f"{verb} {data['modules']} module updates into {data['tensors_merged']} tensors "
        f"({data['tensors_replaced']} replaced by saved modules) of {data['tensors']}; wrote {data['path']} "
        f"({data['shards']} shard(s), {data['bytes_written'] / 1e6:,.1f} MB) in {data['seconds']:.1f} s, "
        f"peak memory {data['peak_rss_mib']:,.0f} MiB"
    )


def _report_each(results: Sequence[object], as_json: bool) -> None:
    """One line per output (``--json``: a list of objects); an error line per failed output, and exit 1."""
    rows = []
    for r in results:
        data = asdict(r)  # type: ignore[call-overload]
        data["path"] = str(data["path"])
        if data["merge"] is not None:
            data["merge"]["path"] = str(data["merge"]["path"])
        rows.append(data)
    if as_json:
        out.json(rows)
    else:
        for data in rows:
            merged = data["merge"]
            if merged is None:
                continue
            for w in merged["warnings"]:
                out.warn(f"{data['name']}: {w}")
            out.print(
                f"merged {data['adapter']} ({merged['modules']} module updates) into {data['path']} "
                f"({merged['shards']} shard(s), {merged['bytes_written'] / 1e6:,.1f} MB)"
            )
        ok = [d for d in rows if d["ok"]]
        if ok:
            m = ok[0]["merge"]
            out.print(
                f"{len(ok)} of {len(rows)} outputs written in {m['seconds']:.1f} s, "
                f"peak memory {m['peak_rss_mib']:,.0f} MiB"
            )
    for data in rows:
        if not data["ok"]:
            hint = f" (hint: {data['hint']})" if data["hint"] else ""
            out.error(f"{data['name']}: {data['adapter']}: {data['error']}{hint}; nothing written to {data['path']}")
    if any(not d["ok"] for d in rows):
        raise click.exceptions.Exit(1)


@click.command("merge")
@click.argument("adapters", nargs=-1, required=True, shell_complete=complete_paths)
@click.option(
    "--into",
    "base",
    required=True,
    metavar="BASE",
    shell_complete=complete_paths,
    help="Base checkpoint: a folder (safetensors, single or sharded) or a store ref (org/name@rev); a local one "
    "also maps a kohya adapter's names to modules.",
)
@weights_option
@device_option
@dtype_option
@shard_option
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "fp4", "int8"]),
    default=None,
    help="Write the merged model in bitsandbytes' layout (loads with transformers). A bitsandbytes base is "
    "always read; without this flag its merge is written in 16 bits.",
)
@click.option(
    "--each",
    is_flag=True,
    help="One merged model per adapter, in OUT/<adapter name>, reading the base once (each output is the merge of "
    "that adapter alone; a failed one is reported and the others are kept; exit 1 if any failed).",
)
@output_options
@token_option
@json_option
def merge_cmd(
    adapters: tuple[str, ...],
    base: str,
    weights: list[float] | None,
    device: str,
    dtype: str,
    max_shard_size: str,
    quantize: str | None,
    each: bool,
    output: str,
    overwrite: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Merge ADAPTERS into the base checkpoint, streaming tensor by tensor (PEFT's arithmetic, bit for bit on CPU).

    Every adapter is validated against the base first. Memory stays bounded by a few tensors; the output
    (shards, index, config, tokenizer files) appears atomically. With --each, every adapter is merged alone into
    its own output folder OUT/<name> (the adapter folder's or repo's name) in one pass over the base.
    """
    if each and weights is not None:
        raise click.UsageError("--weights does not apply to --each: each output merges one adapter with weight 1")
    warmup.start(device)  # torch imports (CUDA starts) while the merge plans and copies what needs no torch
    from adapterhub_cli import api

    if each:
        with out.progress("merging (bytes)") as update:
            results = api.merge_each(
                list(adapters),
                base=base,
                out_dir=output,
                device=device,
                dtype=dtype,
                max_shard_size=max_shard_size,
                quantize=quantize,
                overwrite=overwrite,
                progress=update,
                token=token,
            )
        _report_each(results, as_json)
        return
    with out.progress("merging (bytes)") as update:
        result = api.merge(
            list(adapters),
            base=base,
            out=output,
            weights=weights,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            quantize=quantize,
            overwrite=overwrite,
            progress=update,
            token=token,
        )
    _report(result, as_json, "merged")


@click.command("unmerge")
@click.argument("adapters", nargs=-1, required=True, shell_complete=complete_paths)
@click.option(
    "--from",
    "merged",
    required=True,
    metavar="MERGED",
    shell_complete=complete_paths,
    help="The merged checkpoint: a folder or a store ref; a local one also maps a kohya adapter's names to modules.",
)
@weights_option
@device_option
@dtype_option
@click.option(
    "--max-shard-size",
    default=None,
    callback=_shard_size,
    metavar="SIZE",
    help="Largest output shard, e.g. 5GB or 500MB (default: the shard files of --from, tensor for tensor).",
)
@output_options
@token_option
@json_option
def unmerge_cmd(
    adapters: tuple[str, ...],
    merged: str,
    weights: list[float] | None,
    device: str,
    dtype: str,
    max_shard_size: str | None,
    output: str,
    overwrite: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Subtract ADAPTERS from a merged checkpoint, giving the base back (exact up to the dtype's rounding).

    The output keeps the shard layout of --from unless --max-shard-size is given."""
    warmup.start(device)
    from adapterhub_cli import api

    with out.progress("unmerging (bytes)") as update:
        result = api.unmerge(
            list(adapters),
            merged=merged,
            out=output,
            weights=weights,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=update,
            token=token,
        )
    _report(result, as_json, "subtracted")
