"""`adapters inspect`."""

from __future__ import annotations

import click

from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import allow_pickle_option, base_option, complete_paths, json_option, token_option


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


@click.command("inspect")
@click.argument("adapter", shell_complete=complete_paths)
@click.option(
    "--modules",
    "show_modules",
    is_flag=True,
    help="Add a table with a row per module: name, d_out x d_in, r, alpha, scale, dtype, DoRA.",
)
@click.option(
    "--spectrum",
    is_flag=True,
    help="Load the factors and add a table with a row per module: ||dW||_F, effective rank at 90% / 99% "
    "energy (rank@90%, rank@99%) and the top 4 singular values of dW = scale * B @ A (from the r x r core, "
    "never the dense matrix).",
)
@click.option("--no-hash", is_flag=True, help="Skip the sha256 of the tensor file.")
@base_option
@allow_pickle_option
@token_option
@json_option
def inspect_cmd(
    adapter: str,
    show_modules: bool,
    spectrum: bool,
    no_hash: bool,
    base: str | None,
    allow_pickle: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Show what an adapter is: config, ranks, targets, sizes, hash; reads headers, not weights
    (--spectrum loads the factors).

    ADAPTER is an adapter folder or file (PEFT, kohya, diffusers, or one quantized by this tool) or a store ref
    (org/name@v1.2.0, hf://org/name@rev, file:///srv/adapters/org/name@^1.2).
    """
    from adapterhub_cli import api

    lora = api.load(adapter, allow_pickle=allow_pickle, base=base, token=token)
    report = api.inspect(lora, modules=show_modules, spectrum=spectrum, sha256=not no_hash)
    if as_json:
        out.json(report.to_dict())
        return
    for w in report.warnings:
        out.warn(w)
    targets = report.target_modules
    rows = [
        ("path", report.path),
        *([("pinned", report.pinned)] if report.pinned else []),
        ("format", report.format),
        ("peft type", report.peft_type),
        ("r", report.r if report.ranks == [report.r] else f"{report.r} (ranks present: {report.ranks})"),
        ("lora_alpha", report.lora_alpha),
        ("scale", f"{report.scale:g}  ({report.scale_rule}{', rsLoRA' if report.use_rslora else ''})"),
        ("rank_pattern", report.rank_pattern or "-"),
        ("alpha_pattern", report.alpha_pattern or "-"),
        ("target_modules", ", ".join(targets) if isinstance(targets, list) else targets),
        ("DoRA", "yes" if report.use_dora else "no"),
        ("lora_bias", "yes: lora_B has a bias, added to the layer's bias" if report.lora_bias else "no"),
        ("fan_in_fan_out", "yes" if report.fan_in_fan_out else "no"),
        ("modules_to_save", ", ".join(report.modules_to_save) if report.modules_to_save else "-"),
        ("base model", report.base_model_name_or_path or "-"),
        ("revision", report.revision or "-"),
        ("task type", report.task_type or "-"),
        ("modules", report.num_modules),
        ("parameters", f"{report.num_parameters:,}"),
        ("dtypes", ", ".join(f"{k} ({v:,})" for k, v in report.dtypes.items())),
        ("file", report.tensor_file or "-"),
        ("size", _size(report.file_size)),
        ("sha256", report.sha256 or "-"),
    ]
    if report.alora_invocation_tokens is not None:
        rows.append(
            (
                "aLoRA",
                f"acts only after the invocation tokens {report.alora_invocation_tokens}; cannot be merged "
                "(PEFT refuses it too)",
            )
        )
    if report.layer_replication:
        rows.append(("layer_replication", f"{report.layer_replication} (base layers stacked; cannot be merged)"))
    if report.trainable_token_indices is not None:
        rows.append(("trainable tokens", f"{report.trainable_token_indices} (embedding rows replaced)"))
    if report.quantization:
        rows.append(("quantization", f"{report.quantization}; `adapters dequantize` gives a PEFT-loadable copy"))
    if report.provenance:
        p = report.provenance
        rows.append(("produced by", f"{p.get('operation')} {p.get('parameters')} with {p.get('tool')}"))
        rows += [("  input", f"{i.get('source')} (sha256 {str(i.get('sha256'))[:12]})") for i in p.get("inputs", [])]
    out.print(out.key_values(rows))
    if report.modules is not None:
        t = out.table("modules", "module", "d_out x d_in", "r", "alpha", "scale", "dtype", "DoRA")
        for m in report.modules:
            t.add_row(
                m.name,
                f"{m.d_out} x {m.d_in}",
                str(m.rank),
                f"{m.alpha:g}",
                f"{m.scale:g}",
                m.dtype,
                "yes" if m.dora else "",
            )
        out.print(t)
    if report.spectrum is not None:
        t = out.table(
            "spectrum of dW = scale * B @ A",
            "module",
            "||dW||_F",
            "rank@90%",
            "rank@99%",
            "top singular values",
            wrap_last=True,
        )
        for s in report.spectrum:
            top = ", ".join(f"{x:.3g}" for x in s.singular_values[:4]) + (" ..." if len(s.singular_values) > 4 else "")
            t.add_row(
                s.name,
                f"{s.fro_norm:.4g}",
                str(s.effective_rank_90 or "-"),
                str(s.effective_rank_99 or "-"),
                top if s.fro_norm > 0 else "zero update (B = 0)",
            )
        out.print(t)
